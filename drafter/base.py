"""The Proposer interface every drafter implements.

The engine owns requests; each step it asks its proposer for up to k_i draft
tokens per request, giving the committed tokens so far (prompt + output; the
last one is not yet in the target's KV cache). A proposer keeps whatever
per-request state it needs (a draft model's KV cache, for example) keyed by
request id, re-syncs it from `tokens` on every call (so rollback and the
all-accepted case need no callback), and drops it on `release`.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class DraftInput:
    req_id: int
    tokens: list[int]                     # committed tokens: prompt + output so far
    k: int                                # draft tokens wanted, >= 1
    temperature: float = 0.0              # 0: greedy drafting
    top_k: int = 0                        # 0: off
    top_p: float = 1.0                    # 1.0: off
    generator: torch.Generator | None = None  # the request's generator (sampling drafters draw from it)


@dataclass
class Proposal:
    tokens: list[int]                     # at most k draft tokens (may be fewer, even none)
    probs: torch.Tensor | None = None     # (len(tokens), V) float32: the distribution each token was drawn
                                          # from, after temperature/top-k/top-p; None: a one-hot draft
    kind: int | None = None               # a class of proposals the drafter expects to be accepted alike (the
                                          # n-gram drafter's match length and whether the text followed its last
                                          # proposal); the controller keeps acceptance apart per kind


class Proposer(ABC):
    """Proposes draft tokens for a batch of requests."""

    name: str = "proposer"
    synthetic: bool = False               # synthetic drafters exist for benchmarks only
    cheap: bool = False                   # proposing costs nothing next to a step: an auto engine asks at the
                                          # cap before it plans and cuts each proposal to the planned k

    @abstractmethod
    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        """One Proposal per input, in order."""

    def release(self, req_id: int) -> None:
        """The request finished or was preempted: drop its state (default: none kept)."""

    def catch_up(self, req_id: int, num_tokens: int) -> int:
        """Tokens this drafter would first have to run through before drafting
        for a request that has `num_tokens` committed tokens (a draft model's
        cache lags while the request does not draft). Default: none."""
        return 0
