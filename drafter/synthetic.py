"""SYNTHETIC drafter, for benchmarks only: never reachable from the serving API.

It knows each benchmark prompt's true greedy continuation (recorded from the
target beforehand) and proposes it with a chosen acceptance rate, so the cost
of speculation can be measured as a function of acceptance without training
a drafter. It costs nothing to run, which a benchmark must account for.
"""

import torch

from .base import DraftInput, Proposal, Proposer


class SyntheticProposer(Proposer):
    """SYNTHETIC, for benchmarks only. For a request whose tokens are a known
    prompt P followed by output o (a prefix of P's continuation c), proposes
    up to k tokens at i = len(o): draft j is c[i+j] with probability
    alpha * decay**j, otherwise a token that is surely wrong. Nothing is
    proposed beyond the end of c. The coin flips come from the proposer's own
    generator (seeded by `seed`), never the request's, so a benchmark's
    acceptance does not perturb its sampling. Drafts are one-hot (probs None).

    continuations: prompt token tuple -> true continuation. When several
    prompts prefix the tokens, the longest wins.
    """

    name = "synthetic"
    synthetic = True

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], alpha: float, decay: float = 1.0, *,
                 vocab_size: int, seed: int = 0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"synthetic drafter: alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"synthetic drafter: decay must be in [0, 1], got {decay}")
        if vocab_size < 2:
            raise ValueError(f"synthetic drafter: vocab_size must be >= 2 to have a wrong token, got {vocab_size}")
        for prompt, cont in continuations.items():
            bad = [t for t in (*prompt, *cont) if not 0 <= t < vocab_size]
            if not prompt or bad:
                raise ValueError(f"synthetic drafter: prompt {prompt[:8]}... is empty or holds token "
                                 f"{bad[:1]} outside 0..{vocab_size - 1}")
        self.continuations = {tuple(p): list(c) for p, c in continuations.items()}
        self._lengths = sorted({len(p) for p in self.continuations}, reverse=True)
        self.alpha, self.decay, self.vocab_size = alpha, decay, vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def _continuation(self, inp: DraftInput) -> tuple[list[int], int]:
        """(continuation, position i = len(output)) of a request."""
        for n in self._lengths:
            cont = self.continuations.get(tuple(inp.tokens[:n])) if n <= len(inp.tokens) else None
            if cont is not None:
                out = inp.tokens[n:]
                m = min(len(out), len(cont))
                if out[:m] != cont[:m]:
                    j = next(j for j in range(m) if out[j] != cont[j])
                    raise ValueError(f"synthetic drafter: request {inp.req_id}: output token {j} is {out[j]}, "
                                     f"the recorded continuation has {cont[j]} (greedy decoding of the model "
                                     f"that recorded the continuations is required)")
                return cont, len(out)
        raise ValueError(f"synthetic drafter: request {inp.req_id}: its tokens start with none of the "
                         f"{len(self.continuations)} known prompts")

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        out = []
        for inp in inputs:
            if inp.k < 1:
                raise ValueError(f"request {inp.req_id}: k must be >= 1, got {inp.k}")
            cont, i = self._continuation(inp)
            k = max(0, min(inp.k, len(cont) - i))
            u = torch.rand(k, generator=self.generator, dtype=torch.float64).tolist()
            r = torch.randint(0, self.vocab_size - 1, (k,), generator=self.generator).tolist()
            # A miss is shifted by 1..V-1 from the true token: never equal to it.
            out.append(Proposal([cont[i + j] if u[j] < self.alpha * self.decay ** j
                                 else (cont[i + j] + 1 + r[j]) % self.vocab_size for j in range(k)]))
        return out
