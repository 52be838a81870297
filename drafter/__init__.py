"""Drafters: proposers of speculative tokens behind one interface (`Proposer`).

- `NgramProposer`: prompt lookup, no model;
- `ModelProposer` via `draft_model_proposer` (a small draft checkpoint) or
  `layer_skip_proposer` (the target's first layers, self-speculation);
- `SyntheticProposer`: SYNTHETIC, for benchmarks only.
"""

from .base import DraftInput, Proposal, Proposer
from .model_proposer import ModelProposer, draft_model_proposer, layer_skip_proposer
from .ngram import NgramProposer
from .synthetic import SyntheticProposer

__all__ = ["DraftInput", "Proposal", "Proposer", "NgramProposer", "ModelProposer", "draft_model_proposer",
           "layer_skip_proposer", "SyntheticProposer"]
