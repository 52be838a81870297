"""Prompt lookup (n-gram) drafting: no model.

The drafts are the tokens that followed an earlier occurrence of the
sequence's last n tokens, trying the longest n first: the most recent
occurrence that is followed by at least k tokens, else the one followed by the
most (a repetition's latest occurrence is followed by only a token or two) (the idea of
prompt-lookup decoding in transformers and vLLM's n-gram proposer). It pays
off where the output copies from the context: code edits, summaries, RAG.

`lookup` scans the whole sequence; the proposer answers the same from an
index per request (n-gram -> start positions) that grows with the committed
tokens, so a decode step costs a few dictionary probes instead of a scan of
the context (~0.08 ms against ~0.01 ms a step at 200-400 tokens, timed alone,
next to a batch-1 step of the bundled model of ~2 ms).
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


class NgramIndex:
    """One sequence's n-grams (min_n <= n <= max_n) -> their start positions
    (ascending), for the starts followed by at least one token. `extend`
    indexes what is new; `lookup` answers as the module's `lookup` does."""

    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self.starts = {n: {} for n in range(min_n, max_n + 1)}   # n -> {gram: [start, ...]}
        self.matched = 0            # n of the last lookup's match (0: none)
        self.last: tuple[int, list[int]] = (0, [])      # (length then, tokens) of the last proposal

    def extend(self, tokens: list[int]) -> None:
        """Index `tokens`, which continue the tokens indexed so far."""
        old = len(self.tokens)
        self.tokens.extend(tokens[old:])
        L, seq = len(self.tokens), self.tokens
        for n, grams in self.starts.items():
            # Starts s with s + n <= L - 1 are indexed; those up to old - 1 - n already were.
            for s in range(max(0, old - n), L - n):
                grams.setdefault(tuple(seq[s:s + n]), []).append(s)

    def lookup(self, k: int) -> list[int]:
        seq, L = self.tokens, len(self.tokens)
        for n in range(min(self.max_n, L - 1), self.min_n - 1, -1):
            hits = self.starts[n].get(tuple(seq[L - n:]))
            if hits:
                start = hits[0]                  # followed by the most tokens
                for s in reversed(hits):         # the most recent followed by k (at most k fail)
                    if s + n + k <= L:
                        start = s
                        break
                self.matched = n
                return seq[start + n:start + n + k]
        self.matched = 0
        return []

    def follows_last(self) -> bool:
        """The tokens committed since the last proposal agree with it (all its
        drafts accepted, or a prefix of it plus a bonus token it proposed too)."""
        at, prop = self.last
        new = self.tokens[at:at + len(prop)]
        return bool(prop) and bool(new) and new == prop[:len(new)]


class NgramProposer(Proposer):
    """Proposes the continuation of the longest recent n-gram match
    (min_n <= n <= max_n); one-hot drafts (probs None), the same at any temperature."""

    cheap = True      # a few dictionary probes; the auto engine asks at the cap before it plans

    def __init__(self, min_n: int = 1, max_n: int = 3, name: str = "ngram"):
        if not isinstance(min_n, int) or min_n < 1:
            raise ValueError(f"ngram min_n must be an integer >= 1, got {min_n!r}")
        if not isinstance(max_n, int) or max_n < min_n:
            raise ValueError(f"ngram max_n must be an integer >= min_n ({min_n}), got {max_n!r}")
        self.min_n, self.max_n, self.name = min_n, max_n, name
        self._index: dict[int, NgramIndex] = {}

    def _synced(self, inp: DraftInput) -> NgramIndex:
        """The request's index, extended to inp.tokens; rebuilt when inp.tokens
        does not continue what it indexed (the id now names another sequence)."""
        idx = self._index.get(inp.req_id)
        if idx is None or len(inp.tokens) < len(idx.tokens) or inp.tokens[:len(idx.tokens)] != idx.tokens:
            idx = self._index[inp.req_id] = NgramIndex(self.min_n, self.max_n)
        idx.extend(inp.tokens)
        return idx

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        """Each proposal's kind is n + max_n * f for a match of n tokens, f = 1
        when the text followed this request's last proposal: a 3-token match
        in text that is following a copy is far likelier accepted than a
        1-token match (on the bundled model's held-out text, 96% against 39% at
        the first position; scripts/ngram_kinds.py), which the controller's
        acceptance estimate keeps apart."""
        out = []
        for inp in inputs:
            if inp.k < 1:
                raise ValueError(f"request {inp.req_id}: k must be >= 1, got {inp.k}")
            idx = self._synced(inp)
            follows = idx.follows_last()
            tokens = idx.lookup(inp.k)
            idx.last = (len(idx.tokens), tokens)
            out.append(Proposal(tokens, kind=idx.matched + self.max_n * follows if tokens else None))
        return out

    def release(self, req_id: int) -> None:
        self._index.pop(req_id, None)
