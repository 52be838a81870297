"""The speculation controller: per step and per request, how many tokens to
draft (0 allowed), priced by the cost model and valued by the acceptance
estimate.

Plan (one call per step, before the drafter runs). Start from k_i = 0 for
every request the controller decides for; the step is then worth
V = (requests sampling) tokens in T = cost(plan) seconds. Repeatedly extend
one request's draft from k_i to some k' <= cap_i, choosing the extension with
the best expected tokens gained per second added,

    dV = sum_{k_i <= j < k'} prod_{m <= j} a_{i,m}      dT = cost(plan + ext) - cost(plan)

and take it only while it raises goodput: dV > G * dT * (1 + margin), and a
request's first drafts only by more than the cost model's recent error can
explain, dV > G * dT * (1 + margin + hedge * MAPE) (the hedge guards drafting
at all against "off"; past the first draft a wrong price cuts both ways), where G
is the larger of the plan's own rate V / T and the recent steps' measured
rate (a prefill-heavy step's own rate undervalues the time its drafts add).
Extensions of several tokens are priced whole, so a drafter's fixed cost
(paid once, by the first request that drafts) does not stop a plan that pays
only beyond one token. When that climb stops, every uniform depth (all
requests drafting min(u, cap_i)) is priced as a whole plan, and the fastest
that beats the climb's plan by the same test is taken and climbed on from:
under a price that falls with the step's tokens (the cost model's knee,
experts that saturate) no single request's extension may pay alone while all
of them drafting deep does. No request drafting means the drafter is skipped.

Around the plan:
- a request whose drafting realised fewer tokens than its break-even over a
  window of 16 drafted steps (by more than two standard deviations) is cooled down (k = 0) for a number of steps that doubles
  each time (capped), then probed again with one draft; so is a request the
  plan has kept at 0 for that long, so estimates never freeze;
- when the cost model's prediction error (MAPE over a window, the worst 10% of
  steps left out) exceeds a bound,
  the plan ignores timings until it recovers (and `stats` says so): each auto
  request drafts while its next draft is expected accepted with probability
  >= 1/2, at most `fallback_k` tokens;
- a step where no request it decides for can draft (prompt parts, an n-gram
  lookup without a match) is not planned;
- the cost model learns from every step until its error is known, then from
  1 in N drafting steps, N set so that learning costs about `learn_budget` of
  the step time (N = 1 where steps are long);
- the decision's own time is measured (`overhead`).
"""

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import torch

from .acceptance import AcceptanceEstimator
from .cost_model import CostModel
from .expert_overlap import ExpertOverlap


@dataclass
class _ReqState:
    idle: int = 0                   # consecutive steps without drafting
    backoff: int = 8                # steps of the next cool-down / probe interval
    cooldown: int = 0               # steps left with k forced to 0
    probe: bool = False             # draft one token next step to refresh the estimate
    probed: bool = False            # a probe ran; the next full plan tells whether it found drafting pays
    window: deque = field(default_factory=lambda: deque(maxlen=16))  # (accepted, break-even) per drafted step


@dataclass
class Decision:
    """What `plan` decided, kept until `observe`."""
    ctx: list | None                # cached tokens per scheduled entry (None: a quiet step not sampled)
    breakeven: dict                 # req id -> tokens the request's drafts had to gain to pay
    lag: list                       # per entry: tokens the drafter had to catch up on first
    learn: bool = True              # the step's timing and routing feed the cost model


class Controller:
    def __init__(self, runner, proposer, k_max: int = 8, *, fallback_k: int = 4, mape_bound: float = 0.5,
                 margin: float = 0.01, max_backoff: int = 256, explore: float = 1.0, reuse_weight: float = 1.0,
                 replan_every: int = 16, reuse_every: int = 4, hedge: float = 1.0, profile: bool = True,
                 profile_budget_s: float = 3.0, learn_budget: float = 0.005, log=None):
        if k_max < 1:
            raise ValueError(f"controller k_max must be >= 1, got {k_max}")
        self.k_max, self.fallback_k, self.mape_bound = k_max, fallback_k, mape_bound
        self.margin, self.max_backoff, self.explore, self.hedge = margin, max_backoff, explore, hedge
        self.acceptance = AcceptanceEstimator(k_max)
        self.proposer = proposer
        model = getattr(runner, "model", None)
        itemsize = getattr(getattr(model, "dtype", None), "itemsize", 4)
        self.cost = CostModel(runner.config, ep=getattr(runner, "ep", 1), itemsize=itemsize)
        if profile:
            self.cost.profile(runner, proposer, budget_s=profile_budget_s, log=log)
        self._state: dict[int, _ReqState] = {}
        self._decision: Decision | None = None
        self._kinds: dict = {}          # request id -> the kind of its proposal this step (cheap drafters)
        # Expert reuse: each request's (layer, expert) pairs at its last step, where the runner can report
        # per-token routing (in-process models; not across EP workers).
        stats = getattr(model, "routing_stats", None)
        self.overlap = ExpertOverlap(self.cost.experts.E, reuse_weight)
        self._ids_stats = None
        if stats is not None and runner.config.moe is not None and reuse_weight > 0:
            stats.keep_ids = True
            self._ids_stats = stats
        # Quiet: the last full plan drafted nothing; until a probe is accepted, replan_every steps pass (more,
        # see below) or a request that plan did not decide for needs a decision, steps skip the plan (and the
        # drafter).
        self.quiet = False
        self._quiet_steps = 0
        self._quiet_ids: frozenset = frozenset()    # the requests the plan that turned quiet decided for
        self._quiet_kinds: frozenset = frozenset()  # and the kinds of their proposals (cheap drafters)
        self.replan_every = replan_every
        # A full plan that finds the same requests quiet again doubles the quiet stretch (up to 8 x replan_every):
        # at batch 1 each such plan (~0.2 ms in the step loop) came every 16 steps of ~2 ms.
        self._quiet_every = replan_every
        # Quiet steps are all alike (no drafts) and each one sampled costs ~0.1 ms in the step loop (features,
        # prediction, error window; numpy cold after the forward): 1 in 32 feeds the cost model once its error
        # is known (1 in 8 before that, and always for a kept plan's steps), a multiple of 8 so observe's test
        # for those holds too.
        self.quiet_sample_every = 32
        # Learning (features, prediction, error window, refits, routing masks) costs ~60-100 us a step on CPU,
        # numpy cold after the forward: ~4% of a 2.6 ms batch-1 step of the bundled model. Once the model's error
        # is known, full plans' steps feed it 1 in `_learn_every`, the interval that keeps that cost near
        # learn_budget of the step time (every step where steps are long).
        self.learn_budget = learn_budget
        self._learn_every = 1
        self._learn_wait = 0
        self._learn_s = 0.0         # EWMA of a sampled step's learning time
        self._routing_s = 0.0
        # Steady: the last full plans gave every request the same k; until the batch, a cap, a probe or a
        # cool-down changes, or reuse_every steps pass, the plan is kept (and those steps teach nothing new).
        self.reuse_every = reuse_every
        self.array_from = 8                 # requests from which the plan's search runs on arrays (cheaper)
        self._last: tuple | None = None     # (auto ids, caps, k) of the last full plan
        self._last_breakeven: dict = {}
        self._steady = 0                    # consecutive full plans equal to their predecessor
        self._since_full = 0
        self.reused = 0
        self.start_backoff = 8      # first probe interval of a new request (learned from probes' outcomes)
        self.fallback = False
        self.k_chosen: Counter = Counter()
        self.overhead_s = 0.0       # planning + observing, summed
        self.step_s = 0.0           # the steps' own time, summed (for the overhead fraction)
        self.cooldowns = 0
        self.probes = 0
        self.goodput = 0.0          # committed tokens per second of recent steps (EWMAs of tokens and seconds)
        self._g_tok = self._g_s = 0.0
        self._observed = 0

    # ---- planning --------------------------------------------------------------------------------------------

    def plan(self, sched, is_auto) -> float:
        """Set `s.k` of every scheduled entry `is_auto(s)` says the controller
        decides for (keeping s.k as the cap); others keep theirs. Returns the
        seconds the decision took."""
        t0 = time.perf_counter()
        # proposal kinds (cheap drafters, asked before the plan): acceptance is estimated and learned per kind
        self._kinds = {s.req.id: s.kind for s in sched if s.kind is not None}
        # "Nothing pays" was decided for one batch: a request arriving while quiet is planned for at once (the
        # tail of a batch, 1-2 requests with a token or two left, may not pay where the next batch does).
        # So is a proposal of a kind that plan did not see (a copy the n-gram drafter found after 1-gram guesses).
        if self.quiet and self._quiet_steps < self._quiet_every and all(
                s.req.id in self._quiet_ids and s.kind in self._quiet_kinds
                for s in sched if is_auto(s) and not s.partial and s.k > 0):
            return self._quiet_plan(sched, is_auto, t0)
        if not any(s.k > 0 and not s.partial and is_auto(s) for s in sched):
            return self._idle_plan(sched, is_auto, t0)
        fixed_k = [0 if is_auto(s) else s.k for s in sched]
        q = [float(s.num_new + f) for s, f in zip(sched, fixed_k)]
        ctx = [float(s.req.num_cached) for s in sched]
        auto = [i for i, s in enumerate(sched) if is_auto(s) and not s.partial and s.k > 0]
        sampling = sum(1 for s in sched if not s.partial)
        k = [0] * len(sched)
        breakeven: dict[int, float] = {}
        lag = self._lag(sched)
        reuse = (not self.fallback and self._steady >= 2 and self._since_full + 1 < self.reuse_every
                 and self._reusable(sched, auto))
        if reuse:
            self._since_full += 1
            self.reused += 1
            for i, kk in zip(auto, self._last[2]):
                k[i] = kk
            breakeven = self._last_breakeven
        elif self.fallback:
            # Timing-free rule: draft while the next draft is expected accepted with
            # probability >= 1/2, at most fallback_k.
            ids = [sched[i].req.id for i in auto]
            surv = (np.cumprod(self.acceptance.estimate(ids, kinds=[sched[i].kind for i in auto]), axis=1) if ids
                    else np.zeros((0, self.k_max)))
            for j, i in enumerate(auto):
                st = self._new_state(ids[j])
                want = 0 if st.cooldown > 0 else max(int(np.sum(surv[j] >= 0.5)), int(st.probe))
                k[i] = min(want, self.fallback_k, sched[i].k)
        elif auto:
            self._greedy(sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag)
            last = (tuple(sched[i].req.id for i in auto), tuple((sched[i].k, sched[i].kind) for i in auto),
                    tuple(int(k[i]) for i in auto))
            self._steady = self._steady + 1 if self._last is not None and last == self._last else 0
            self._last, self._last_breakeven, self._since_full = last, breakeven, 0
        for i in auto:
            sched[i].k = int(k[i])
            self.k_chosen[int(k[i])] += 1
        decided = set(auto)
        for i, s in enumerate(sched):       # auto entries not decided here (prompt parts, no room) draft 0
            if i not in decided and is_auto(s):
                s.k = 0
        if not reuse:
            was_quiet, was_ids = self.quiet, self._quiet_ids
            self.quiet = not self.fallback and bool(auto) and not any(k[i] for i in auto)
            self._quiet_steps = 0
            self._quiet_ids = frozenset(sched[i].req.id for i in auto) if self.quiet else frozenset()
            self._quiet_kinds = (((self._quiet_kinds if was_quiet else frozenset())
                                  | frozenset(sched[i].kind for i in auto)) if self.quiet else frozenset())
            self._quiet_every = (min(2 * self._quiet_every, 8 * self.replan_every)
                                 if self.quiet and was_quiet and self._quiet_ids == was_ids else self.replan_every)
            if self._ids_stats is not None:
                self._ids_stats.keep_ids = not self.quiet     # per-token routing only matters while drafting
        if reuse:
            learn = (self._observed + 1) % 8 == 0      # a kept plan's steps teach little new: 1 in 8
        else:
            learn = self._learn_due()
        plan_s = time.perf_counter() - t0
        self._decision = Decision(ctx, breakeven, lag, learn=learn)
        self.overhead_s += plan_s
        return plan_s

    def _quiet_plan(self, sched, is_auto, t0: float) -> float:
        """Nothing drafted at the last full plan, nothing learned since and no
        request it did not decide for: only probes draft. The cheapest path (a
        step of a small model is ~1 ms): no arrays, and the features of the step
        only when it is one of the 1 in `quiet_sample_every` that feed the cost model."""
        self._quiet_steps += 1
        chosen = self.k_chosen
        for s in sched:
            if not is_auto(s):
                continue
            if s.partial or s.k <= 0:
                s.k = 0
                continue
            st = self._state.get(s.req.id) or self._new_state(s.req.id)
            s.k = 1 if st.probe and not st.cooldown else 0
            chosen[s.k] += 1
        every = self.quiet_sample_every if self.cost.mape is not None else 8     # 1 in 8 until the error is known
        return self._unplanned(sched, (self._observed + 1) % every == 0, t0)

    def _idle_plan(self, sched, is_auto, t0: float) -> float:
        """No request the controller decides for can draft this step (prompt
        parts, or a drafter that delivered nothing: an n-gram lookup without a
        match, half the steps at batch 1): nothing to plan, and the quiet and
        steady state stay as the last full plan left them."""
        for s in sched:
            if is_auto(s):
                s.k = 0
        return self._unplanned(sched, self._learn_due(), t0)

    def _unplanned(self, sched, learn: bool, t0: float) -> float:
        """A step decided without a plan: what observe needs (the step's features only if it learns)."""
        if learn:
            self._decision = Decision([float(s.req.num_cached) for s in sched], {}, self._lag(sched), learn=True)
        else:
            self._decision = Decision(None, {}, None, learn=False)
        plan_s = time.perf_counter() - t0
        self.overhead_s += plan_s
        return plan_s

    def _learn_due(self) -> bool:
        """Whether this step (not a kept plan's, not a quiet one) feeds the cost model."""
        self._learn_wait += 1
        if self._learn_wait >= self._learn_every or self.cost.mape is None:
            self._learn_wait = 0
            return True
        return False

    def _reusable(self, sched, auto) -> bool:
        """The last full plan applies unchanged: same requests and caps, none probing or cooling down."""
        ids, caps, _ = self._last
        if len(auto) != len(ids):
            return False
        for i, rid, cap in zip(auto, ids, caps):
            s = sched[i]
            if s.req.id != rid or (s.k, s.kind) != cap:
                return False
            st = self._state.get(rid)
            if st is None or st.probe or st.cooldown or st.probed:
                return False
        return True

    def _greedy(self, sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag_all) -> None:
        """Rounds of: every request's best extension (tokens gained per second
        added, priced at the round's plan), then, in order of that ratio, take
        each whose price re-checked at the current plan still raises goodput.
        Scalar Python over at most B * k_max candidates per round: cheaper
        than array code at the sizes a step has."""
        cost, ex = self.cost, self.cost.experts
        c0, c_seq, c_tok, c_exp, c_attn, c_a2a, c_past = (float(v) for v in cost.c)
        d_any, d_seq, d_tok, d_depth, d_lag = (float(v) for v in cost.d)
        # tokens: c_tok each up to the knee, c_past each beyond (+ the all-to-all's share of every one):
        # c_tok * min(n, knee) + c_past * max(n - knee, 0) = c_past * n + (c_tok - c_past) * min(n, knee)
        knee, c_a2a = cost.knee, c_a2a * cost.a2a_mb_per_token
        c_lin, c_bend = c_past + c_a2a, c_tok - c_past
        beta, distinct = ex.beta, ex.predict_from_neff       # distinct experts per layer from n_eff
        exp_scale = c_exp * cost.moe_layers / cost.ep
        ids = [sched[i].req.id for i in auto]
        caps = [min(sched[i].k, self.k_max) for i in auto]
        probes = []
        for j, rid in enumerate(ids):          # cool-downs and probes
            st = self._new_state(rid)
            if st.cooldown > 0:
                caps[j] = 0
            elif st.probe:
                caps[j] = min(caps[j], 1)
                probes.append(j)
        # cum[j][m]: expected tokens gained by drafting m tokens (sum of survival products)
        cum = self.acceptance.gains(ids, explore=self.explore, kinds=[sched[i].kind for i in auto])
        base = [float(q[i]) for i in auto]
        ctxs = [float(ctx[i]) for i in auto]
        reuse = self.overlap.shares(ids, [sched[i].req.id for i in range(len(sched))])
        qs = q
        n = sum(qs)
        neff = sum(x ** beta for x in qs)
        attn = sum(a * b + a * (a + 1) / 2 for a, b in zip(qs, ctx)) / 1000.0
        drafting = sum(1 for f in fixed_k if f > 0)
        dtok = float(sum(fixed_k))
        depth = float(max(fixed_k, default=0))
        lag = sum(g for g, f in zip(lag_all, fixed_k) if f > 0)
        lags = [lag_all[i] for i in auto]
        fixed_t = c0 + c_seq * len(qs)

        def price(n_, neff_, attn_, drafting_, dtok_, depth_, lag_):
            t = fixed_t + c_lin * n_ + c_bend * min(n_, knee) + exp_scale * distinct(neff_) + c_attn * attn_
            if drafting_:
                t += d_any + d_seq * drafting_ + d_tok * dtok_ + d_depth * depth_ + d_lag * lag_
            return t

        T = max(price(n, neff, attn, drafting, dtok, depth, lag), 1e-9)
        V = float(sampling)
        kk = [0] * len(ids)
        # Hedge by the model's recent error: a gain the model cannot tell from noise is not taken.
        mape = self.cost.trimmed_mape
        # The hedge guards the decision to draft at all (against "off"); a request already drafting
        # deepens at the plain margin: past the first draft an error in the price cuts both ways.
        hedged = 1.0 + self.margin + self.hedge * (mape if mape is not None else 0.1)
        plain = 1.0 + self.margin
        # The price of a second: what this step makes of it, or what recent steps did if that is
        # more (a prefill-heavy step's own rate undervalues the time its drafts would add).
        g_ref = self.goodput
        if not g_ref:
            # No step measured yet (an engine's first): a prompt's prefill step's own rate is what its drafts
            # would be priced at otherwise (~90 tokens/s on the bundled pair, where it decodes at ~500, so its
            # first prefill drafted 8 that cannot pay); its sampled requests' decode step, as priced, stands in.
            dec = self.cost.target_features([1] * sampling, [s.req.num_cached + s.num_new - 1 for s in sched
                                                             if not s.partial])
            g_ref = sampling / max(self.cost.predict(dec, np.zeros(len(self.cost.d))), 1e-9)

        def grow(agg, j, k0, k1):
            """The plan's aggregates after request j drafts k1 instead of k0."""
            n_, neff_, attn_, drafting_, dtok_, depth_, lag_ = agg
            dk, b, first = k1 - k0, base[j] + k0, k0 == 0
            # tokens whose experts the rest of the step loads anyway add fewer new ones
            return (n_ + dk, neff_ + ((b + dk) ** beta - b ** beta) * (1.0 - reuse[j]),
                    attn_ + (dk * (ctxs[j] + b) + dk * (dk + 1) / 2) / 1000.0, drafting_ + first, dtok_ + dk,
                    max(depth_, k1), lag_ + (lags[j] if first else 0))

        def extension(j, kp):
            """(dv, dT, new aggregates) of request j drafting kp instead of kk[j]."""
            agg = grow((n, neff, attn, drafting, dtok, depth, lag), j, kk[j], kp)
            return cum[j][kp] - cum[j][kk[j]], price(*agg) - T, agg

        def search_scalar():
            cands = []
            for j in range(len(ids)):
                best, best_kp = 0.0, 0
                for kp in range(kk[j] + 1, caps[j] + 1):
                    dv, dT, _ = extension(j, kp)
                    if dv > max(V / T, g_ref) * max(dT, 0.0) * (plain if kk[j] else hedged):
                        r = dv / max(dT, 1e-12)
                        if r > best:
                            best, best_kp = r, kp
                if best_kp:
                    cands.append((best, j, best_kp))
            return cands

        if len(ids) >= self.array_from:     # the same search over (request, depth) arrays
            B, KP = len(ids), np.arange(1, self.k_max + 1)
            cum_a, base_a, ctx_a = np.array(cum), np.array(base), np.array(ctxs)
            keep_a, lags_a, caps_a, rows_a = 1.0 - np.array(reuse), np.array(lags, dtype=float), np.array(caps), \
                np.arange(B)

            def search():
                kk_a = np.array(kk)
                dk = KP[None, :] - kk_a[:, None]
                valid = (dk > 0) & (KP[None, :] <= caps_a[:, None])
                if not valid.any():
                    return []
                dk = np.maximum(dk, 0)
                b = base_a + kk_a
                neff_ = neff + ((b[:, None] + dk) ** beta - (b ** beta)[:, None]) * keep_a[:, None]
                attn_ = attn + (dk * (ctx_a + b)[:, None] + dk * (dk + 1) / 2) / 1000.0
                first = kk_a == 0
                # every candidate drafts, so the drafter's terms always apply
                t = (fixed_t + c_lin * (n + dk) + c_bend * np.minimum(n + dk, knee) + exp_scale * distinct(neff_)
                     + c_attn * attn_
                     + d_any + d_seq * (drafting + first)[:, None] + d_tok * (dtok + dk)
                     + d_depth * np.maximum(depth, KP)[None, :] + d_lag * (lag + lags_a * first)[:, None])
                dT = t - T
                dv = cum_a[:, 1:] - cum_a[rows_a, kk_a][:, None]
                margin_a = np.where(first, hedged, plain)[:, None]
                ok = valid & (dv > max(V / T, g_ref) * np.maximum(dT, 0.0) * margin_a)
                r = np.where(ok, dv / np.maximum(dT, 1e-12), -np.inf)
                bj = r.argmax(axis=1)
                br = r[rows_a, bj]
                return [(float(br[j]), int(j), int(bj[j]) + 1) for j in np.nonzero(br > 0)[0]]
        else:
            search = search_scalar
        agg0, V0, T0 = (n, neff, attn, drafting, dtok, depth, lag), V, T
        for phase in range(2):
            while True:
                cands = search()
                if not cands:
                    break
                taken = 0
                for _, j, kp in sorted(cands, reverse=True):
                    dv, dT, agg = extension(j, kp)
                    if dv <= max(V / T, g_ref) * max(dT, 0.0) * (plain if kk[j] else hedged):
                        continue
                    breakeven[ids[j]] = breakeven.get(ids[j], 0.0) + max(V / T, g_ref) * max(dT, 0.0)
                    n, neff, attn, drafting, dtok, depth, lag = agg
                    V += dv
                    T += dT
                    kk[j] = kp
                    taken += 1
                if not taken:
                    break
            if phase or len(ids) < 2:
                break
            # A concave price (the step's fixed part, experts that saturate, a token slope that falls past
            # the knee) can make every single request's extension look dear while all of them drafting
            # together pays: price every uniform depth as a whole plan and, of those that beat the greedy
            # plan by the same test, take the one of the highest goodput and climb on from it.
            g = max(V / T, g_ref)
            factor = plain if any(kk) else hedged
            best = None
            for u in range(1, max(caps) + 1):
                ku = [min(u, c) for c in caps]
                if ku == kk:
                    continue
                agg, V_u = agg0, V0
                for j, kj in enumerate(ku):
                    if kj:
                        agg = grow(agg, j, 0, kj)
                        V_u += cum[j][kj]
                T_u = max(price(*agg), 1e-9)
                gain = (V_u - V) - g * max(T_u - T, 0.0) * factor
                if V_u > V and gain > 0 and (best is None or V_u / T_u > best[0]):     # the fastest that pays
                    best = (V_u / T_u, ku, agg, V_u, T_u)
            if best is None:
                break
            _, ku, agg, V_u, T_u = best
            m = sum(1 for v in ku if v)
            breakeven.clear()
            for j, kj in enumerate(ku):
                if kj:
                    breakeven[ids[j]] = g * max(T_u - T0, 0.0) / m
            kk[:] = ku
            n, neff, attn, drafting, dtok, depth, lag = agg
            V, T = V_u, T_u
        for j, rid in enumerate(ids):          # did a past probe find drafting pays? sets new requests' interval
            st = self._state[rid]
            if st.probed:
                st.probed = False
                self.start_backoff = (max(8, self.start_backoff // 2) if kk[j] else
                                      min(self.start_backoff * 2, self.max_backoff))
        for j in probes:                       # a probe drafts one token even where the plan would not
            if caps[j] and not kk[j]:
                dv, dT, agg = extension(j, 1)
                n, neff, attn, drafting, dtok, depth, lag = agg
                T += dT
                kk[j] = 1
        for j, i in enumerate(auto):
            k[i] = kk[j]

    # ---- learning --------------------------------------------------------------------------------------------

    def observe(self, results, q, drafts, target_s: float, draft_s: float, step_s: float,
                distinct: list[int] | None) -> None:
        """After the step. results: (req id, drafts planned, accepted, auto) per
        sampled request (drafts the drafter did not deliver count as rejected:
        the estimate is of tokens gained per draft asked for); q and drafts:
        tokens appended and drafts delivered per scheduled entry, in plan order;
        distinct: measured distinct experts per layer (None if not recorded)."""
        t0 = time.perf_counter()
        d = self._decision
        self._observed += 1
        # Full plans feed the cost model (1 in _learn_every), a kept plan's steps 1 in 8, quiet steps 1 in
        # quiet_sample_every.
        sample = d is not None and d.ctx is not None and d.learn
        if sample and len(d.ctx) == len(q):
            x = self.cost.target_features(q, d.ctx)
            z = self.cost.draft_features(drafts, d.lag)
            predicted = self.cost.predict(x, z)          # the model's price of what actually ran
            moe = [v for v in (distinct or []) if v]
            if moe:
                self.cost.experts.observe(q, sum(moe) / len(moe))
                x[3] = sum(moe) / self.cost.ep            # fit on the measured count
            self.cost.observe(x, z, target_s, draft_s, predicted)
            spent = time.perf_counter() - t0 + self._routing_s
            self._learn_s = spent if not self._learn_s else 0.9 * self._learn_s + 0.1 * spent
        self._routing_s = 0.0
        if results:
            self.acceptance.observe([r[0] for r in results], [r[1] for r in results], [r[2] for r in results],
                                    [self._kinds.get(r[0]) for r in results] if self._kinds else None)
        for rid, drafted, accepted, auto in results:
            if not auto:
                continue
            st = self._new_state(rid)
            if st.cooldown > 0:
                st.cooldown -= 1
                if st.cooldown == 0:
                    st.probe = True
                continue
            if drafted:
                st.idle = 0
                if st.probe:                # a probe only refreshes the estimate; the next plan decides
                    st.probe = False
                    st.probed = True
                    self.probes += 1
                    if accepted:
                        self.quiet = False
                    continue
                st.window.append((accepted, d.breakeven.get(rid, 0.0) if d else 0.0))
                if len(st.window) == st.window.maxlen:
                    got = sum(a for a, _ in st.window)
                    need = sum(b for _, b in st.window)
                    if got + 2.0 * (got + 1.0) ** 0.5 < need:     # below break-even beyond chance
                        self._cool(st)
                    else:
                        st.backoff = 8
            else:
                st.idle += 1
                if st.idle >= st.backoff:
                    # Old evidence fades over the idle steps, then one draft refreshes it.
                    self.acceptance.relax(rid, 0.97 ** st.idle)
                    st.idle = 0
                    st.probe = True
                    st.backoff = min(st.backoff * 2, self.max_backoff)
        mape = self.cost.trimmed_mape
        if mape is not None:
            if not self.fallback and mape > self.mape_bound:
                self.fallback = True
            elif self.fallback and mape < self.mape_bound / 1.5:
                self.fallback = False
        if step_s > 0 and results:
            # A ratio of averages: the average of per-step ratios would be biased upward by noisy step times.
            tok = sum(r[2] + 1 for r in results)
            if self._g_tok == 0.0:
                self._g_tok, self._g_s = tok, step_s
            else:
                self._g_tok, self._g_s = 0.9 * self._g_tok + 0.1 * tok, 0.9 * self._g_s + 0.1 * step_s
            self.goodput = self._g_tok / self._g_s
            self._learn_every = min(16, max(1, math.ceil(self._learn_s / (self.learn_budget * self._g_s))))
        self.step_s += step_s
        self.overhead_s += time.perf_counter() - t0

    def _lag(self, sched) -> list[int]:
        """Per entry: tokens the drafter must catch up on before it can draft."""
        if self.proposer is None:
            return [0] * len(sched)
        return [self.proposer.catch_up(s.req.id, len(s.req.tokens)) for s in sched]

    def _new_state(self, rid: int) -> _ReqState:
        st = self._state.get(rid)
        if st is None:     # a new request starts probing at the interval its predecessors reached
            st = self._state[rid] = _ReqState(backoff=self.start_backoff)
        return st

    def _cool(self, st: _ReqState) -> None:
        st.cooldown = st.backoff
        st.backoff = min(st.backoff * 2, self.max_backoff)
        st.window.clear()
        self.cooldowns += 1

    def observe_routing(self, req_ids, lengths, token_experts: torch.Tensor | None) -> None:
        """Remember which experts each request's tokens used this step.
        token_experts: (MoE layers, T, K) ids of the step's T tokens, requests'
        chunks back to back with `lengths` tokens each."""
        if token_experts is None or len(req_ids) < 2 or self.overlap.weight <= 0:
            return          # overlap needs two requests in a step; one alone has nobody to share with
        if self._decision is not None and not self._decision.learn:
            return          # a kept plan: the masks of its last full plan's step serve until the next
        t0 = time.perf_counter()
        self.overlap.record(req_ids, lengths, token_experts)
        self._routing_s = time.perf_counter() - t0
        self.overhead_s += self._routing_s

    def forget(self, req_id: int) -> None:
        self._state.pop(req_id, None)
        self.overlap.forget(req_id)
        self.acceptance.forget(req_id)

    # ---- reporting -------------------------------------------------------------------------------------------

    def stats(self) -> dict:
        return {
            "cost_model_mape": self.cost.mape,
            "cost_model_trimmed_mape": self.cost.trimmed_mape,
            "controller_fallback": self.fallback,
            "controller_overhead": self.overhead_s / self.step_s if self.step_s else None,
            "controller_k_histogram": dict(self.k_chosen),
            "controller_cooldowns": self.cooldowns,
            "controller_probes": self.probes,
            "controller_plans_kept": self.reused,
            "acceptance_curve": self.acceptance.global_curve.tolist(),
            "acceptance_by_kind": self.acceptance.kind_curves(),
            "distinct_experts_beta": self.cost.experts.beta,
            "goodput_tokens_per_s": self.goodput,
            "expert_reuse_planning": bool(self.overlap),
        }
