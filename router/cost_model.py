"""The step-time model the speculation controller prices plans with.

    T(plan) = T_target(x) + T_draft(z)
    x = [1, sequences, min(tokens, knee), distinct experts (summed over MoE layers,
         per rank), attention units, all-to-all MB, max(0, tokens - knee)]
    z = [any drafting, drafting sequences, draft tokens, draft depth,
         tokens the drafter must catch up on first (a draft model's lagging cache)]

Both parts are linear in their features with non-negative coefficients, so
the target's price of a token is piecewise linear in the step's tokens: one
slope up to the knee, another past it, each >= 0 (on CPU the per-token cost
of a forward falls as steps grow, GEMMs running more efficiently on more
rows: a slope fitted on short steps alone had priced a 2,560-token prompt
step of moe-bench at 2.2 s against 0.85 s measured; where a model turns
compute-bound the second slope comes out the steeper one). The knee is chosen
from `KNEES` by the fit (at the profile and every 4th refit). The
distinct-expert feature is not observed before the step: `DistinctExperts`
predicts it from the plan's tokens per sequence, with an exponent learned from
routing statistics that captures intra-sequence locality (the k+1 tokens of
one sequence reuse experts more than k+1 tokens of different sequences).
Where the machine's curve bends more than the features do, a line in tokens
fitted to the residuals of the recent decode steps at about the current
number of sequences corrects the target's price there (router/local_fit.py).

Coefficients start from a profiling pass on this machine (`profile`: MoE
expert compute at chosen token and distinct-expert counts, whole target
forwards at chosen batch, tokens and contexts, including a few steps of
32-384 tokens over up to 32 sequences so the second slope is measured, not
extrapolated, the drafter at chosen batch and depth) and are refitted online
from measured steps, the profile acting as a prior. `mape` is the mean absolute percentage error of the predictions made
before each step, over a window.
"""

import time
from collections import deque

import numpy as np
import torch

from ..experts.batch import Chunk
from .local_fit import LocalFit
from .nnls import nnls

TARGET_FEATURES = ("fixed", "seqs", "tokens", "experts", "attn", "a2a_mb", "tokens_past_knee")
TOK, PAST = 2, 6            # the two token columns: min(n, knee), max(0, n - knee)
KNEES = (32, 64, 128, 256)  # where the second token slope may start
DRAFT_FEATURES = ("any", "seqs", "tokens", "depth", "catch_up")
ATTN_UNIT = 1000.0          # attention units: query-key pairs / 1000


class DistinctExperts:
    """Expected distinct experts per MoE layer for a step whose sequences
    append q_i tokens each: E * (1 - (1 - K/E) ** n_eff), n_eff = sum q_i**beta.
    beta = 1 is independent routing of every token; beta < 1 is locality
    within a sequence. beta is refitted from observed (q, distinct) pairs."""

    BETAS = np.linspace(0.1, 1.0, 19)

    def __init__(self, num_experts: int, top_k: int, window: int = 128, max_tokens: int | None = None):
        self.E, self.K = num_experts, top_k
        # Steps with a sequence of more tokens (a prompt's prefill) are not fitted: plans price decode steps of
        # 1..k_max + 1 tokens a sequence, and a long prefill's locality is another regime (on the bundled model a
        # window mixing both fitted 0.6 and priced 2-3-token steps' experts 8-11% low).
        self.max_tokens = max_tokens
        self.miss = 1.0 - top_k / num_experts if num_experts else 1.0
        self.beta = 1.0
        self._obs: deque = deque(maxlen=window)
        self._since_fit = 0
        self._pow = np.power(np.arange(129, dtype=float)[:, None], self.BETAS)     # q ** beta, q = 0..128

    def predict_from_neff(self, n_eff):
        """Distinct experts for an n_eff (a float, or an array of them)."""
        return self.E * (1.0 - self.miss ** n_eff)

    def n_eff(self, q) -> float:
        b = self.beta
        return float(sum(v ** b for v in q))

    def predict(self, q) -> float:
        return float(self.predict_from_neff(self.n_eff(q))) if self.E else 0.0

    def observe(self, q, mean_distinct: float) -> None:
        # A step of one token per sequence has n_eff = len(q) at every beta: it adds the same error to each and
        # tells nothing, yet it took a place in the window; at batch 1 a run of undrafted steps (each a
        # decode of 1 token) filled the window with ties and beta fell to the first candidate, 0.1.
        if not self.E or not len(q) or max(q) <= 1 or (self.max_tokens is not None and max(q) > self.max_tokens):
            return
        # n_eff of this step for every candidate beta, computed once (rows of a table for small counts)
        if all(type(v) is int and 0 <= v < len(self._pow) for v in q):
            neff = self._pow[q[0]] if len(q) == 1 else self._pow[list(q)].sum(axis=0)
        else:
            neff = np.power(np.asarray(q, dtype=float)[:, None], self.BETAS).sum(axis=0)
        self._obs.append((neff, mean_distinct))
        self._since_fit += 1
        if self._since_fit >= 8:
            self.fit()

    def fit(self) -> None:
        self._since_fit = 0
        if len(self._obs) < 4:
            return
        neff = np.array([o[0] for o in self._obs])                 # (W, betas)
        d = np.array([o[1] for o in self._obs])
        err = ((self.predict_from_neff(neff) - d[:, None]) ** 2).sum(axis=0)
        self.beta = float(self.BETAS[int(np.argmin(err))])


def _min_time(fn, reps: int) -> float:
    """The fastest of `reps` timed calls after a warm-up (robust to other load on the machine)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


class CostModel:
    def __init__(self, config, ep: int = 1, itemsize: int = 4, window: int = 128, prior_weight: float = 0.25,
                 knees=KNEES, decode_tokens: int | None = None):
        """decode_tokens: the most tokens a sequence appends in a planned step (k_max + 1); longer
        chunks (prefills) do not feed the locality fit (DistinctExperts.max_tokens)."""
        self.config, self.ep = config, max(1, ep)
        self.knees = tuple(knees)
        self.knee = float(64 if 64 in self.knees else self.knees[0])   # until a profile or refit chooses
        self._prior_by_knee: dict = {}              # knee -> the profile's coefficients with that knee
        self._refits = 0
        moe = config.moe
        self.moe_layers = sum(1 for i in range(config.num_layers) if config.is_moe_layer(i)) if moe else 0
        self.experts = DistinctExperts(moe.num_experts if moe else 0, moe.top_k if moe else 1,
                                       max_tokens=decode_tokens)
        # dispatch + combine of each routed row, the share that leaves the rank, per MoE layer, in MB
        self.a2a_mb_per_token = (0.0 if self.ep == 1 or not moe else
                                 2 * moe.top_k * config.hidden_size * itemsize * (self.ep - 1) / self.ep
                                 * self.moe_layers / 1e6)
        self.c = np.zeros(len(TARGET_FEATURES))     # seconds per unit of each feature
        self.d = np.zeros(len(DRAFT_FEATURES))
        self._prior_c: np.ndarray | None = None
        self._prior_d: np.ndarray | None = None
        self.prior_weight = prior_weight
        self._profile_x: list = []                  # profile points, kept as anchors for refits
        self._profile_z: list = []
        self.local = LocalFit(decode_tokens or 9)    # residual line at the batch running now (local_fit.py)
        # _profile_large's shapes: up to large_seqs sequences with about large_sizes tokens in all; large_decode:
        # chunks at most decode_tokens long (verification-shaped), else as long as the totals need (at 32
        # sequences 12 and 4). scripts/bench_profile.py compares them; the defaults are the ones it kept.
        self.large_seqs, self.large_decode, self.large_sizes = 32, False, (384, 128, 1)
        # _profile_forward's slots (two groups, one per context: batches up to forward_seqs / 2), and whether the
        # per-expert coefficient is pinned to _profile_moe's micro-profile (else fitted with the rest).
        self.forward_seqs, self.pin_experts = 8, True
        self._x: deque = deque(maxlen=window)
        self._z: deque = deque(maxlen=window)
        self._err: deque = deque(maxlen=64)
        self._err_sum = 0.0
        self._tmape: float | None = None
        self._steps = 0
        self._since_fit = 0
        self._z_new = False
        self.profile_seconds = 0.0
        self.profile_large_seconds = 0.0            # the part of it spent on the steps of 32-384 tokens

    # ---- features --------------------------------------------------------------------------------------------

    def target_features(self, q, ctx) -> np.ndarray:
        """q[i] tokens appended after ctx[i] cached ones, per sequence in the step."""
        n = float(sum(q))
        experts = self.moe_layers * self.experts.predict(q) / self.ep
        attn = sum(a * b + a * (a + 1) * 0.5 for a, b in zip(q, ctx)) / ATTN_UNIT
        kn = self.knee
        return np.array([1.0, len(q), min(n, kn), experts, float(attn), n * self.a2a_mb_per_token, max(0.0, n - kn)])

    @staticmethod
    def _split_row(x: np.ndarray, knee: float) -> None:
        """A target feature row's two token columns split at `knee` (in place)."""
        n = x[TOK] + x[PAST]
        x[TOK], x[PAST] = min(n, knee), max(n - knee, 0.0)

    @staticmethod
    def reknee(A: np.ndarray, knee: float) -> np.ndarray:
        """Rows of target features with their two token columns split at another knee (a copy)."""
        A = np.array(A, dtype=float, ndmin=2)
        n = A[:, TOK] + A[:, PAST]
        A[:, TOK], A[:, PAST] = np.minimum(n, knee), np.maximum(n - knee, 0.0)
        return A

    def _set_knee(self, knee: float) -> None:
        """Move the model to another knee: the stored rows are split anew (in place)."""
        if knee == self.knee:
            return
        self.knee = float(knee)
        for x, _ in list(self._x) + list(self._profile_x):
            self._split_row(x, knee)
        if knee in self._prior_by_knee:
            self._prior_c = self._prior_by_knee[knee].copy()

    @staticmethod
    def draft_features(k, catch_up=None) -> np.ndarray:
        k = [float(v) for v in k]
        m = float(sum(1 for v in k if v))
        lag = sum(c for c, v in zip(catch_up, k) if v) if catch_up is not None else 0.0
        return np.array([1.0 if m else 0.0, m, sum(k), max(k, default=0.0), float(lag)])

    def predict(self, x: np.ndarray, z: np.ndarray) -> float:
        return float(self.c @ x + self.d @ z) + self.local.correction(int(x[1]), x[TOK] + x[PAST], self.c)

    # ---- profiling -------------------------------------------------------------------------------------------

    def profile(self, runner, proposer=None, budget_s: float = 3.0, log=None, large_budget_s: float = 2.0) -> None:
        """Time this machine: MoE expert compute at chosen rows and distinct
        experts, whole target forwards at chosen (batch, tokens, context) and
        (with a budget of its own) at 32-384 tokens per step, the drafter at
        chosen (batch, depth). Sets the prior coefficients and the knee."""
        t_start = time.perf_counter()
        deadline = t_start + budget_s
        moe_prior = self._profile_moe(runner, deadline) if self.pin_experts else None
        X, y = self._profile_forward(runner, deadline)
        self.profile_large_seconds = 0.0
        if X:
            t_large = time.perf_counter()
            XL, yL = self._profile_large(runner, t_large + large_budget_s)
            self.profile_large_seconds = time.perf_counter() - t_large
            self.fit_profile(X + XL, y + yL, moe_prior)
        self._prior_c = self.c.copy()
        Z, yz = self._profile_draft(runner, proposer, deadline)
        if Z:
            self._profile_z = list(zip(Z, yz))
            self.d = nnls(np.array(Z), np.array(yz))
        self._prior_d = self.d.copy()
        self.profile_seconds = time.perf_counter() - t_start
        if log:
            log(f"cost model profiled in {self.profile_seconds:.2f} s: " + ", ".join(
                f"{n}={v * 1e6:.1f}us" for n, v in zip(TARGET_FEATURES, self.c)) + f", knee={self.knee:.0f}")

    def fit_profile(self, X, y, moe_prior: float | None = None) -> None:
        """The prior coefficients from profile points (target feature rows, seconds),
        by relative error (as the refits), at every knee: the knee whose fit
        leaves the smallest relative error is taken. A knee with no point past it
        has no second slope to fit: the first one is extended (a linear price)."""
        self._profile_x = [(np.array(x, dtype=float), float(t)) for x, t in zip(X, y)]
        if not self._profile_x:
            return
        b = np.array([t for _, t in self._profile_x])
        w = 1.0 / np.maximum(b, 1e-6)
        best = None
        for knee in self.knees:
            A = self.reknee(np.array([x for x, _ in self._profile_x]), knee)
            past = bool((A[:, PAST] > 0).any())
            if not past:                   # one token column, the whole count
                A[:, TOK] += A[:, PAST]
            cols = [j for j in range(A.shape[1]) if (past or j != PAST) and (moe_prior is None or j != 3)]
            Aw, bw = A * w[:, None], b * w
            if moe_prior is not None:      # pin the per-expert coefficient to the micro-profile
                bw = bw - Aw[:, 3] * moe_prior
            c = np.zeros(A.shape[1])
            c[cols] = nnls(Aw[:, cols], bw)
            if moe_prior is not None:
                c[3] = moe_prior
            err = float(np.sum((A @ c * w - 1.0) ** 2))
            if not past:
                c[PAST] = c[TOK]
            self._prior_by_knee[knee] = c
            if best is None or err < best[0] * (1 - 1e-9):
                best = (err, knee)
        knee = best[1]
        self._set_knee(knee)             # the rows were split at the current knee, as target_features does
        self.c = self._prior_by_knee[knee].copy()
        self._prior_c = self.c.copy()

    def _profile_moe(self, runner, deadline) -> float | None:
        """Seconds per distinct expert per MoE layer, from the expert compute of
        one MoE layer at fixed routed rows and a varying number of experts."""
        model = getattr(runner, "model", None)
        layers = getattr(model, "layers", None)
        moe = next((l.moe for l in layers if getattr(l, "moe", None) is not None), None) if layers else None
        if moe is None or not hasattr(moe, "grouped"):
            return None
        E, D = self.experts.E, self.config.hidden_size
        pts = []
        with torch.inference_mode():
            for rows in (8, 32):
                for distinct in sorted({1, max(1, min(E, rows) // 4), max(1, min(E, rows) // 2), min(E, rows)}):
                    if time.perf_counter() > deadline:
                        break
                    counts = torch.zeros(E, dtype=torch.int64)
                    counts[:distinct] = rows // distinct
                    counts[0] += rows - int(counts.sum())
                    x = torch.randn(rows, D, dtype=model.dtype, device=model.device) * 0.1
                    counts = counts.to(model.device)
                    pts.append((rows, distinct, _min_time(lambda: moe.grouped(x, counts), 3)))
        if len(pts) < 3:
            return None
        A = np.array([[1.0, r, dd] for r, dd, _ in pts])
        coef = nnls(A, np.array([t for _, _, t in pts]))
        return float(coef[2])

    def _random_tokens(self, seed: int):
        """n -> n random token ids, from a generator of its own."""
        V, gen = self.config.vocab_size, torch.Generator().manual_seed(seed)
        return lambda n: torch.randint(0, V, (n,), generator=gen).tolist()

    @staticmethod
    def _timed_step(runner, slots, ctx0: int, q: int, rand) -> tuple[float, object]:
        """(seconds, routing) of one target forward of q random tokens on each
        slot after ctx0 cached. Every token's logits, as a verification step
        asks (the LM head per row is a per-token cost: on a small model it is
        most of it), returned as a greedy step returns them (argmax only:
        under EP no logits rows cross back)."""
        B = len(slots)
        chunks = [Chunk(s, ctx0, rand(q)) for s in slots]
        t0 = time.perf_counter()
        o = runner.run(chunks, routing=True, num_logits=[q] * B, full=[False] * B)
        return time.perf_counter() - t0, o.routing

    def _point(self, B: int, q: int, ctx0: int, routing) -> np.ndarray:
        """Target features of B sequences of q tokens after ctx0, with the distinct experts as measured."""
        x = self.target_features([q] * B, [ctx0] * B)
        if routing is not None and self.moe_layers:
            x[3] = sum(routing.distinct_experts) / self.ep
        return x

    def _profile_forward(self, runner, deadline):
        """Whole target forwards at chosen (batch, tokens) and two contexts.
        The two contexts are timed alternately (two groups of slots), each
        point's figure the fastest of its repetitions: a step another process
        stretched says nothing about the plan's price, and timing one context
        after the other would let a change of load pass for attention cost."""
        cache = runner.cache
        slots = []
        X, y = [], []
        try:
            while cache.free_slots and len(slots) < self.forward_seqs:
                slots.append(cache.allocate())
            if not slots:
                return X, y
            rand = self._random_tokens(0)
            ctx_lo = min(16, cache.capacity // 4)
            ctx_hi = max(ctx_lo, min(256, cache.capacity - 9))
            if len(slots) >= 2 and ctx_hi > ctx_lo:
                half = len(slots) // 2
                groups = [(ctx_lo, slots[:half]), (ctx_hi, slots[half:2 * half])]
            elif ctx_hi > ctx_lo:
                # One slot (an engine of max_batch 1): both contexts on it, filled to the longer once (a step
                # after ctx_lo overwrites rows the one after ctx_hi reads, which changes no timing). At one
                # context the token and attention columns are nearly collinear (attention units grow with q
                # too), and a slow 8-token run had priced a token at ctx 85 by attention at 10x its cost.
                groups = [(ctx_lo, slots), (ctx_hi, slots)]
            else:
                groups = [(ctx_lo, slots)]
            for ctx0, group in groups[::-1]:            # the longer context first: a shared slot keeps it
                runner.run([Chunk(s, 0, rand(ctx0)) for s in group])           # fill the context
            size = len(groups[0][1])
            # The most telling points first, in case the budget runs out.
            points = [(B, q) for B in sorted({1, 4, size, 2}) for q in (1, 8, 3) if B <= size]
            for B, q in points:
                if time.perf_counter() > deadline:
                    break
                best: dict = {}
                for rep in range(4):                  # rep 0 warms up
                    for ctx0, group in groups:
                        if ctx0 + q > cache.capacity:
                            continue
                        t, routing = self._timed_step(runner, group[:B], ctx0, q, rand)
                        if rep and (ctx0 not in best or t < best[ctx0][0]):
                            best[ctx0] = (t, routing)
                for ctx0, (t, routing) in best.items():
                    X.append(self._point(B, q, ctx0, routing))
                    y.append(t)
                    if routing is not None and self.moe_layers:
                        self.experts.observe([q] * B, routing.mean_distinct)
            self.experts.fit()
        finally:
            for s in slots:
                cache.free(s)
        return X, y

    def _profile_large(self, runner, deadline, rounds: int = 3):
        """Whole target forwards of many tokens: up to 32 sequences at once with
        about 384 and 128 tokens in all, and one token each (the defaults of
        large_seqs and large_sizes). The short steps
        of `_profile_forward` (at most 32 tokens) say nothing of the second
        token slope, and a batch of 64 drafting 4-8 each runs 300-600 tokens a
        step. One context (the prefill that fills it, 16 tokens per sequence,
        warms up); the shapes are timed in turn, `rounds` times while the
        budget lasts (at least twice each), each point the fastest of its runs:
        these few points alone set the price of a step of 32 sequences, and on
        a shared machine the fastest of 2 runs back to back had put a step of
        32 x 1 tokens at 89-150 ms where the engine's ran in 75 (the plan then
        saw drafting at batch 32 as cheaper than it is)."""
        cache = runner.cache
        slots, X, y = [], [], []
        try:
            while cache.free_slots and len(slots) < self.large_seqs:
                slots.append(cache.allocate())
            ctx0 = min(16, cache.capacity // 4)
            room = cache.capacity - ctx0
            if self.large_decode and self.experts.max_tokens:
                room = min(room, self.experts.max_tokens)
            if len(slots) < 2 or room < 2:
                return X, y
            rand = self._random_tokens(2)
            runner.run([Chunk(s, 0, rand(ctx0)) for s in slots])           # fill the context
            B = len(slots)
            shapes = []
            for size in self.large_sizes:
                q = max(1, min(room, round(size / B)))
                if (B, q) not in shapes and (q == 1 or B * q > 32):       # short steps are _profile_forward's
                    shapes.append((B, q))
            best: dict = {}                   # (B, q) -> (the fastest run's seconds, its routing)
            for r in range(rounds):
                for B, q in shapes:
                    # Round 0 starts a shape while the budget lasts, round 1 gives every started one its
                    # second run whatever the budget says, later rounds run while it lasts.
                    if r != 1 and time.perf_counter() > deadline or r and (B, q) not in best:
                        continue
                    t, routing = self._timed_step(runner, slots[:B], ctx0, q, rand)
                    if (B, q) not in best or t < best[(B, q)][0]:
                        best[(B, q)] = (t, routing)
            for (B, q), (t, routing) in best.items():
                X.append(self._point(B, q, ctx0, routing))
                y.append(t)
        finally:
            for s in slots:
                cache.free(s)
        return X, y

    @staticmethod
    def _timed_propose(proposer, inputs) -> float:
        """Seconds of one propose call, its requests released after."""
        try:
            t0 = time.perf_counter()
            proposer.propose(inputs)
            return time.perf_counter() - t0
        finally:
            for inp in inputs:
                proposer.release(inp.req_id)

    def _profile_draft(self, runner, proposer, deadline, reps: int = 2):
        """The drafter at chosen (batch, depth) after a catch-up of 16 tokens,
        and one depth-1 draft after a longer catch-up: with every point at the
        same catch-up its column equals the `any` column and its price is not
        identified (it came out 0 at batch 1, where a probe after 64 undrafted
        tokens or a draft at a 29-token prompt's prefill runs the draft model
        over all of them first, ~17 us a token on the bundled draft). Each
        point the fastest of `reps` runs, fresh requests each, every run right
        after a target forward, as in a step: run back to back the drafter
        keeps its weights in the CPU's caches, and the bundled draft model
        then ran at 0.69 / 2.2 ms for 1 / 4 drafts against 0.89 / 3.3 ms after
        the target's forward (the engine's)."""
        Z, y = [], []
        if proposer is None or getattr(proposer, "synthetic", False):
            return Z, y
        from ..drafter.base import DraftInput
        rand = self._random_tokens(1)
        ids = iter(range(-1, -10_000, -1))        # request ids no real request has
        cache = getattr(proposer, "cache", None)
        room = getattr(cache, "free_slots", 4)
        long_lag = max(16, min(128, getattr(cache, "capacity", 128) - 8))
        points = [(B, k, 16) for B in sorted({1, min(4, room)}) for k in (1, 4) if B >= 1]
        if long_lag > 16 and room >= 1:
            points.insert(2, (1, 1, long_lag))    # before the larger batch, in case the budget runs out
        cache = getattr(runner, "cache", None)
        slot = cache.allocate() if cache is not None and cache.free_slots else None
        try:
            if slot is not None:
                runner.run([Chunk(slot, 0, rand(16))])
            for B, k, lag in points:
                if time.perf_counter() > deadline:
                    break
                best = None
                for _ in range(reps):
                    inputs = [DraftInput(next(ids), rand(lag), k, 0.0, 0, 1.0, None) for _ in range(B)]
                    if slot is not None:               # a target decode step first, as the engine's step runs
                        self._timed_step(runner, [slot], 16, 1, rand)
                    t = self._timed_propose(proposer, inputs)     # the first call includes the catch-up of `lag`
                    best = t if best is None else min(best, t)
                Z.append(self.draft_features([k] * B, [lag] * B))  # each fresh request catches up `lag`
                y.append(best)
        finally:
            if slot is not None:
                cache.free(slot)
        return Z, y

    # ---- online ----------------------------------------------------------------------------------------------

    def observe(self, x: np.ndarray, z: np.ndarray, target_s: float, draft_s: float, predicted: float,
                x_plan: np.ndarray | None = None) -> None:
        """A step ran with features x, z; it took target_s (everything but the
        drafter) and draft_s seconds; `predicted` was the prediction beforehand;
        x_plan: the target features as the plan priced them (its predicted
        distinct experts where x has the measured count; x where not given),
        what the local correction's residuals are of."""
        total = target_s + draft_s
        if total > 0:
            if len(self._err) == self._err.maxlen:
                self._err_sum -= self._err[0]
            e = abs(predicted - total) / total
            self._err.append(e)
            self._err_sum += e
            self._tmape = None
        self._x.append((x, target_s))
        if z[0] > 0 or draft_s > 1e-4:
            self._z.append((z, draft_s))
            self._z_new = True
        self.local.observe(int(x[1]), round(x[TOK] + x[PAST]), x if x_plan is None else x_plan, target_s)
        self._since_fit += 1
        self._steps += 1
        # Refit every 8 steps at first (a large batch runs few steps, and the profile's
        # short steps say little about its long ones), every 32 until the window is
        # full, then every 64 (a refit is 1-2 ms of NNLS).
        if self._since_fit >= (8 if self._steps <= 32 else 32 if self._steps < 128 else 64):
            self.refit()

    def refit(self) -> None:
        """Least squares over the window's steps and the profile points, with a
        pull toward the profiled coefficients (weight prior_weight per step in
        the window) so features the window does not vary keep their profiled value.
        Every 4th refit (after a profile) also tries every knee, each with the
        profile's coefficients at that knee as its prior, and keeps the one whose
        fit leaves the smallest trimmed relative error."""
        self._since_fit = 0
        self._refits += 1
        if self._prior_by_knee and self._refits % 4 == 1 and len(self._x) + len(self._profile_x) >= 4:
            best = None
            for knee in self.knees:
                window = list(zip(self.reknee([x for x, _ in self._x], knee), [t for _, t in self._x])) \
                    if self._x else []
                anchors = list(zip(self.reknee([x for x, _ in self._profile_x], knee),
                                   [t for _, t in self._profile_x])) if self._profile_x else []
                coef = self._fit(window, anchors, self._prior_by_knee[knee], self.c)
                A = np.array([p[0] for p in window + anchors])
                b = np.array([p[1] for p in window + anchors])
                r = np.sort((A @ coef / np.maximum(b, 1e-6) - 1.0) ** 2)
                err = float(r[:max(1, int(len(r) * 0.9))].sum())
                if best is None or err < best[0] * (1 - 1e-9):
                    best = (err, knee, coef)
            self._set_knee(best[1])
            self.c = best[2]
        else:
            self.c = self._fit(self._x, self._profile_x, self._prior_c, self.c)
        if self._z_new:                 # no drafter step since the last refit: nothing new to fit
            self._z_new = False
            self.d = self._fit(self._z, self._profile_z, self._prior_d, self.d)

    def _fit(self, window, anchors, prior, current):
        """NNLS on relative errors (each step weighted by 1 / its time: other load
        on the machine stretches a step by a factor), then again without the
        steps it fits worst beyond 3 median absolute deviations (a step stretched
        by another process says nothing about the plan's price)."""
        pts = list(window) + list(anchors)
        if len(pts) < 4:
            return current
        A = np.array([p[0] for p in pts])
        b = np.array([p[1] for p in pts])
        # Relative errors: a step's time is off by a factor (other load), so each step is weighted by 1/time.
        w = 1.0 / np.maximum(b, 1e-6)
        A, b = A * w[:, None], b * w
        for _ in range(2):
            AA, bb = A, b
            if prior is not None:
                lam = np.sqrt(self.prior_weight * len(A)) * np.maximum(A.std(axis=0), 1e-9)
                AA = np.vstack([A, np.diag(lam)])
                bb = np.concatenate([b, lam * prior])
            coef = nnls(AA, bb)
            res = np.abs(A @ coef - b)
            keep = res <= 3.0 * np.median(res) + 1e-9
            if keep.all() or keep.sum() < 4:
                break
            A, b = A[keep], b[keep]
        return coef

    @property
    def mape(self) -> float | None:
        """Mean absolute percentage error of the last 64 predictions (None before 8)."""
        return self._err_sum / len(self._err) if len(self._err) >= 8 else None

    @property
    def trimmed_mape(self) -> float | None:
        """The same over the last 16 predictions without the worst 10% of them:
        what the plan's hedge and the fallback decision read, so a few steps
        stretched by other load on the machine do not switch the plan off, and a
        refit that mends the model shows within 16 steps."""
        if len(self._err) < 8:
            return None
        if self._tmape is None:
            e = sorted(list(self._err)[-16:])
            e = e[:max(1, int(len(e) * 0.9))]
            self._tmape = sum(e) / len(e)
        return self._tmape
