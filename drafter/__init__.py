"""Drafters: proposers of speculative tokens behind one interface (`Proposer`)."""

from .base import DraftInput, Proposal, Proposer

__all__ = ["DraftInput", "Proposal", "Proposer"]
