"""Prompt lookup (n-gram) drafting: no model, no state.

The drafts are the tokens that followed an earlier occurrence of the
sequence's last n tokens, trying the longest n first: the most recent
occurrence that is followed by at least k tokens, else the one followed by the
most (a repetition's latest occurrence is followed by only a token or two) (the idea of
prompt-lookup decoding in transformers and vLLM's n-gram proposer). It pays
off where the output copies from the context: code edits, summaries, RAG.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .base import DraftInput, Proposal, Proposer


def lookup(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens following an earlier occurrence of the last n tokens of
    `tokens`, for the largest n in max_n..min_n that occurs: the most recent
    occurrence followed by k tokens, else the one followed by the most; [] if none."""
    L = len(tokens)
    if L < min_n + 1:
        return []
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        # Windows starting at 0..L-1-n: each is followed by at least one token,
        # and the suffix itself (starting at L-n) is excluded.
        windows = sliding_window_view(seq[:-1], n)              # (L-n, n)
        hits = np.flatnonzero((windows == seq[L - n:]).all(axis=1))
        if hits.size:
            full = hits[hits + n + k <= L]        # occurrences followed by at least k tokens
            start = int(full[-1] if full.size else hits[0]) + n
            return tokens[start:start + k]
    return []


class NgramProposer(Proposer):
    """Proposes the continuation of the longest recent n-gram match
    (min_n <= n <= max_n); one-hot drafts (probs None), the same at any temperature."""

    def __init__(self, min_n: int = 1, max_n: int = 3, name: str = "ngram"):
        if not isinstance(min_n, int) or min_n < 1:
            raise ValueError(f"ngram min_n must be an integer >= 1, got {min_n!r}")
        if not isinstance(max_n, int) or max_n < min_n:
            raise ValueError(f"ngram max_n must be an integer >= min_n ({min_n}), got {max_n!r}")
        self.min_n, self.max_n, self.name = min_n, max_n, name

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        out = []
        for inp in inputs:
            if inp.k < 1:
                raise ValueError(f"request {inp.req_id}: k must be >= 1, got {inp.k}")
            out.append(Proposal(lookup(inp.tokens, inp.k, self.min_n, self.max_n)))
        return out
