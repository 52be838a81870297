"""SYNTHETIC drafter, for benchmarks only: never reachable from the serving API.

It knows each benchmark prompt's true greedy continuation (recorded from the
target beforehand) and proposes it with a chosen acceptance rate, so the cost
of speculation can be measured as a function of acceptance without training
a drafter. It costs nothing to run, which a benchmark must account for.
"""

import random
from collections import Counter

from .base import DraftInput, Proposal, Proposer


class SyntheticProposer(Proposer):
    """SYNTHETIC, for benchmarks only. For a request whose tokens are a known
    prompt P followed by output o (a prefix of P's continuation c), proposes
    up to k tokens at i = len(o): draft j is c[i+j] with probability
    alpha * decay**j, otherwise a token that is surely wrong. Nothing is
    proposed beyond the end of c. Drafts are one-hot (probs None).

    The coin flips are common random numbers, one per position of the
    continuation: token c[t] gets a coin u_t (and a wrong token) drawn from
    a generator keyed by (seed, prompt, which run of that prompt this request
    is, t), never from the request's generator (a benchmark's acceptance does
    not perturb its sampling), and is proposed right iff u_t < alpha *
    decay**j at draft position j. Asked again at t (its earlier proposal was
    never verified: a draft before it was rejected), the same coin answers,
    which leaves every verified draft's odds as stated, since an unverified
    proposal reveals nothing of u_t. Two engines given the same prompts in the
    same order therefore face the same luck at every position, whatever depth
    they draft at and wherever their steps start (with flat acceptance the
    same tokens are hard for every policy), so policies are compared on the
    same coins; a run of a few dozen steps would otherwise differ by several
    percent in accepted tokens from the coins alone.

    continuations: prompt token tuple -> true continuation. When several
    prompts prefix the tokens, the longest wins. prompt_alpha: prompt token
    tuple -> that prompt's own alpha (requests of differing acceptance in one
    batch, as copy-heavy and free-text requests are); other prompts use alpha.
    """

    name = "synthetic"
    synthetic = True

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], alpha: float, decay: float = 1.0, *,
                 vocab_size: int, seed: int = 0, prompt_alpha: dict[tuple[int, ...], float] | None = None):
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
        self.decay, self.vocab_size, self.seed = decay, vocab_size, seed
        self._prompt_index = {p: n for n, p in enumerate(self.continuations)}
        self.set_alpha(alpha, prompt_alpha)
        self._runs: Counter = Counter()       # prompt -> requests seen with it
        self._run_of: dict[int, tuple[int, int]] = {}     # request id -> (prompt index, run)
        self._coins: dict[int, dict[int, tuple[float, int]]] = {}  # request id -> {t: coin}, drawn once

    def set_alpha(self, alpha: float, prompt_alpha: dict[tuple[int, ...], float] | None = None) -> None:
        """The acceptance rate from now on: `alpha`, or a prompt's own from
        `prompt_alpha` (a benchmark trace changes them between phases)."""
        prompt_alpha = {tuple(p): a for p, a in (prompt_alpha or {}).items()}
        for a in (alpha, *prompt_alpha.values()):
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"synthetic drafter: alpha must be in [0, 1], got {a}")
        unknown = [p for p in prompt_alpha if p not in self._prompt_index]
        if unknown:
            raise ValueError(f"synthetic drafter: prompt_alpha names {len(unknown)} prompt(s) without a "
                             f"continuation, e.g. {unknown[0][:8]}...")
        self.alpha = alpha
        self._alpha_of = {self._prompt_index[p]: a for p, a in prompt_alpha.items()}   # prompt index -> alpha

    def _continuation(self, inp: DraftInput) -> tuple[list[int], int, int]:
        """(continuation, position i = len(output), prompt index) of a request."""
        for n in self._lengths:
            key = tuple(inp.tokens[:n]) if n <= len(inp.tokens) else None
            cont = self.continuations.get(key) if key is not None else None
            if cont is not None:
                out = inp.tokens[n:]
                m = min(len(out), len(cont))
                if out[:m] != cont[:m]:
                    j = next(j for j in range(m) if out[j] != cont[j])
                    raise ValueError(f"synthetic drafter: request {inp.req_id}: output token {j} is {out[j]}, "
                                     f"the recorded continuation has {cont[j]} (greedy decoding of the model "
                                     f"that recorded the continuations is required)")
                return cont, len(out), self._prompt_index[key]
        raise ValueError(f"synthetic drafter: request {inp.req_id}: its tokens start with none of the "
                         f"{len(self.continuations)} known prompts")

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        out = []
        for inp in inputs:
            if inp.k < 1:
                raise ValueError(f"request {inp.req_id}: k must be >= 1, got {inp.k}")
            cont, i, pidx = self._continuation(inp)
            k = max(0, min(inp.k, len(cont) - i))
            run = self._run_of.get(inp.req_id)
            if run is None:
                run = self._run_of[inp.req_id] = (pidx, self._runs[pidx])
                self._runs[pidx] += 1
            alpha = self._alpha_of.get(pidx, self.alpha)
            coins = self._coins.setdefault(inp.req_id, {})
            tokens = []
            for j in range(k):
                coin = coins.get(i + j)
                if coin is None:
                    coin = coins[i + j] = self._coin(run, i + j)
                u, r = coin
                # A miss is shifted by 1..V-1 from the true token: never equal to it.
                tokens.append(cont[i + j] if u < alpha * self.decay ** j
                              else (cont[i + j] + 1 + r) % self.vocab_size)
            out.append(Proposal(tokens))
        return out

    def _coin(self, run: tuple[int, int], t: int) -> tuple[float, int]:
        """(u_t, the wrong token's shift - 1) of position t of a prompt's run."""
        rng = random.Random(f"{self.seed}/{run[0]}/{run[1]}/{t}")
        return rng.random(), rng.randrange(self.vocab_size - 1)

    def release(self, req_id: int) -> None:
        self._run_of.pop(req_id, None)
        self._coins.pop(req_id, None)
