"""The speculation controller: per step and per request, how many tokens to
draft (0 allowed), priced by the cost model and valued by the acceptance
estimate.

Plan (one call per step, before the drafter runs; the search is
router/plan_search.py). Start from k_i = 0 for
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
rate (a prefill-heavy step's own rate undervalues the time its drafts add),
measured over steps of about this many sequences (`goodput_by_batch`: within
1/8 or one; else the decode step of the step's sampled requests, as priced,
stands in, so a batch's tail of a few requests is not priced at the rate the
whole batch ran at).
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
  window of 16 drafted steps (by more than two standard deviations) is
  cooled down (k = 0) for a number of steps that doubles each time
  (capped), then probed again with one draft; so is a request the
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
- an off probe: while the plans draft, the cost model sees only drafted
  steps, and the price of not drafting (the base every plan is measured
  against) comes from the profile and from extrapolation alone; where that
  base is overpriced the draft's added time looks smaller than it is (batch
  64 at acceptance 0.3 on moe-bench, docs/BENCHMARKS.md "Session 7": the
  undrafted 64-token step priced 148 ms against 123 measured, a one-token
  draft's extra time 33 ms against 56, and every step drafted a token). So when a plan drafts, expects less than
  `off_probe_gain` over not drafting, and no undrafted step of about this
  many sequences (within 1/8) fed the cost model in the last
  `off_probe_every` observed steps, the step runs undrafted and is learned
  from (at most once in that many steps, and only where no request of a
  fixed k drafts in it); its cost is bounded by that gain once in that many
  steps;
- a draft probe (off by default, `draft_probe_every` = 0), the mirror of an
  off probe: while the plans draft nothing, the cost model sees no drafted
  step and the price of drafting is extrapolated (on moe-bench at batch 64
  and acceptance 0.6, docs/BENCHMARKS.md "Session 14", a plan priced a draft
  for every request at 144 ms against 126 measured and stayed quiet while
  drafting paid 1.09x). So when a full plan drafts nothing, every request
  drafting one token would lose less than `off_probe_gain` as priced, and no
  step of about this many sequences, half or more of them drafting, fed the
  cost model in the last `draft_probe_every` observed steps, the step drafts
  one token for every request not cooled down and is learned from, and the
  next step plans again instead of staying quiet;
- dither (off by default, `dither_every` = 0): 1 in `dither_every` drafting
  steps (not in fallback, not an off probe, no fixed-k request in the step)
  runs every drafting request one draft deeper or shallower than the plan
  (+1 and -1 in turn, within the caps; a probe keeps its one draft) and is
  learned from, so the local line (router/local_fit.py) sees the price at
  the plan's margin where a steady plan's steps are all one shape. Measured,
  it did not pay: on moe-bench at batch 4 and 16, acceptance 0.6
  (docs/BENCHMARKS.md "Session 9"), 1 in 8 read 0.97-1.05x of no dither and
  1 in 4 0.95-0.99x, the dithered steps' times as noisy as the one-draft
  difference they measure; in simulation the refits learn the slope without
  it, the plan moving through shapes while it learns (tests/test_local_fit.py).
  A knob for long runs;
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
from .plan_search import first_draft_loss, greedy_plan

# The acceptance estimator's settings where the controller's differ from its own: a step ages the curves as at
# most 2 verifications would; the exploration bonus at the frontier position alone.
ACCEPTANCE = {"age_cap": 2, "frontier_only": True}


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
    ctx: list | None                # cached tokens per scheduled entry (None: the step does not feed the cost model)
    breakeven: dict                 # req id -> tokens the request's drafts had to gain to pay
    lag: list                       # per entry: tokens the drafter had to catch up on first
    learn: bool = True              # the step's timing and routing feed the cost model


class Controller:
    def __init__(self, runner, proposer, k_max: int = 8, *, fallback_k: int = 4, mape_bound: float = 0.5,
                 margin: float = 0.01, max_backoff: int = 256, explore: float = 1.0, reuse_weight: float = 1.0,
                 replan_every: int = 16, reuse_every: int = 4, hedge: float = 1.0, profile: bool = True,
                 profile_budget_s: float = 3.0, learn_budget: float = 0.005, off_probe_every: int = 64,
                 off_probe_gain: float = 0.15, dither_every: int = 0, local_slope_strength: float | None = None,
                 acceptance: dict | None = None, goodput_by_batch: bool = True, goodput_decode_only: bool = True,
                 draft_probe_every: int = 0, log=None):
        if k_max < 1:
            raise ValueError(f"controller k_max must be >= 1, got {k_max}")
        self.k_max, self.fallback_k, self.mape_bound = k_max, fallback_k, mape_bound
        self.margin, self.max_backoff, self.explore, self.hedge = margin, max_backoff, explore, hedge
        # acceptance: the estimator's settings over ACCEPTANCE (router/acceptance.py)
        self.acceptance = AcceptanceEstimator(k_max, **{**ACCEPTANCE, **(acceptance or {})})
        self.goodput_by_batch, self.goodput_decode_only = goodput_by_batch, goodput_decode_only
        self.proposer = proposer
        model = getattr(runner, "model", None)
        itemsize = getattr(getattr(model, "dtype", None), "itemsize", 4)
        self.cost = CostModel(runner.config, ep=getattr(runner, "ep", 1), itemsize=itemsize, decode_tokens=k_max + 1)
        if local_slope_strength is not None:
            self.local_slope_strength = local_slope_strength
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
        # see below), or a request that plan did not decide for or a proposal of a kind it did not see needs a
        # decision, steps skip the plan (and the drafter, unless it is a cheap one asked before the plan).
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
        # is known (1 in 8 before that).
        self.quiet_sample_every = 32
        # Learning (features, prediction, error window, refits, routing masks) costs ~60-100 us a step on CPU,
        # numpy cold after the forward: ~4% of a 2.6 ms batch-1 step of the bundled model. Once the model's error
        # is known, full plans' steps feed it 1 in `_learn_every`, the interval that keeps that cost near
        # learn_budget of the step time (every step where steps are long).
        self.learn_budget = learn_budget
        # Off probes (module docstring): undrafted steps that fed the cost model, as (observe count, sequences)
        self.off_probe_every, self.off_probe_gain = off_probe_every, off_probe_gain
        self._base_seen: deque = deque(maxlen=32)
        self._last_off_probe = -math.inf   # the observe count of the last; at most one in off_probe_every steps
        self.plan_gain = 1.0            # the last full plan's expected goodput over none drafting (greedy_plan's)
        self.off_probes = 0
        # draft probes (off by default): the mirror of an off probe, see plan
        self.draft_probe_every = draft_probe_every
        self._drafted_seen: deque = deque(maxlen=32)
        self._last_draft_probe = -math.inf     # as _last_off_probe (none yet: due whenever the knob is set)
        self.draft_probes = 0
        # Dither (module docstring; off by default): 1 in dither_every drafting steps runs every drafting
        # request one draft deeper or shallower (alternately), so the local line sees the plan's margin.
        self.dither_every = dither_every
        self._dither_wait = 0
        self._dither_sign = 1
        self.dithers = 0
        self._learn_every = 1
        self._learn_wait = 0
        self._learn_s = 0.0         # EWMA of a sampled step's learning time
        self._routing_s = 0.0
        # Steady: the last full plans gave every request the same k; until the batch, a cap, a probe or a
        # cool-down changes, or reuse_every steps pass, the plan is kept (and those steps teach nothing new).
        self.reuse_every = reuse_every
        self.array_from = 8                 # requests from which the plan's search runs on arrays (cheaper)
        self._last: tuple | None = None     # (auto ids, (cap, kind) pairs, k) of the last full plan
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
        self.goodput = 0.0          # committed tokens per second of recent decode steps (EWMAs of tokens, seconds)
        self._g_tok = self._g_s = 0.0
        self.goodput_seqs = 0       # the sampled requests of the steps it is of (goodput_by_batch)
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
            self.plan_gain = self._greedy(sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag)
            last = (tuple(sched[i].req.id for i in auto), tuple((sched[i].k, sched[i].kind) for i in auto),
                    tuple(int(k[i]) for i in auto))
            self._steady = self._steady + 1 if self._last is not None and last == self._last else 0
            self._last, self._last_breakeven, self._since_full = last, breakeven, 0
        off_probe = (not reuse and not self.fallback and self.off_probe_every > 0 and any(k[i] for i in auto)
                     and not any(fixed_k) and self.plan_gain < 1.0 + self.off_probe_gain
                     and self._observed - self._last_off_probe >= self.off_probe_every
                     and not self._base_known(len(sched)))
        if off_probe:
            self.off_probes += 1
            self._last_off_probe = self._observed
        draft_probe = (not reuse and not self.fallback and self.draft_probe_every > 0 and bool(auto)
                       and not any(k[i] for i in auto) and not any(fixed_k)
                       and self._observed - self._last_draft_probe >= self.draft_probe_every
                       and not self._drafted_known(len(sched)))
        if draft_probe:         # one draft each, cooled-down requests left out
            probe_k = {i: 0 if (st := self._state.get(sched[i].req.id)) is not None and st.cooldown > 0
                       else min(1, sched[i].k) for i in auto}
            draft_probe = any(probe_k.values()) and first_draft_loss(self, sched, probe_k, q, ctx, lag) < \
                self.off_probe_gain
        if draft_probe:
            self.draft_probes += 1
            self._last_draft_probe = self._observed
        shifted = None
        if not off_probe and not self.fallback and self.dither_every > 0 and not any(fixed_k) and any(
                k[i] for i in auto):
            self._dither_wait += 1
            if self._dither_wait >= self.dither_every:
                shifted = self._dither(sched, auto, k)
        for j, i in enumerate(auto):
            sched[i].k = (0 if off_probe else probe_k[i] if draft_probe else
                          int(k[i]) if shifted is None else shifted[j])
            self.k_chosen[sched[i].k] += 1
        decided = set(auto)
        for i, s in enumerate(sched):       # auto entries not decided here (prompt parts, no room) draft 0
            if i not in decided and is_auto(s):
                s.k = 0
        if not reuse:
            was_quiet, was_ids = self.quiet, self._quiet_ids
            # (a draft probe's step is not quiet: the next step plans with what it measured)
            self.quiet = not self.fallback and bool(auto) and not any(k[i] for i in auto) and not draft_probe
            self._quiet_steps = 0
            self._quiet_ids = frozenset(sched[i].req.id for i in auto) if self.quiet else frozenset()
            self._quiet_kinds = (((self._quiet_kinds if was_quiet else frozenset())
                                  | frozenset(sched[i].kind for i in auto)) if self.quiet else frozenset())
            self._quiet_every = (min(2 * self._quiet_every, 8 * self.replan_every)
                                 if self.quiet and was_quiet and self._quiet_ids == was_ids else self.replan_every)
            if self._ids_stats is not None:
                self._ids_stats.keep_ids = not self.quiet     # per-token routing only matters while drafting
        if reuse:
            learn = (self._observed + 1) % 8 == 0 or shifted is not None   # a kept plan's steps: 1 in 8
        else:
            learn = self._learn_due() or off_probe or draft_probe or shifted is not None
        plan_s = time.perf_counter() - t0
        self._decision = Decision(ctx, breakeven, lag, learn=learn)
        self.overhead_s += plan_s
        return plan_s

    def _dither(self, sched, auto, k) -> list | None:
        """The plan's drafts of the auto entries, every drafting one moved by one
        (+1 and -1 in turn, within its cap and k_max; a probe's one draft stays);
        None where neither sign moves any."""
        still = [not k[i] or (st := self._state.get(sched[i].req.id)) is not None and st.probe for i in auto]
        for sign in (self._dither_sign, -self._dither_sign):
            moved = [k[i] if f else min(max(k[i] + sign, 0), sched[i].k, self.k_max) for f, i in zip(still, auto)]
            if any(m != k[i] for m, i in zip(moved, auto)):
                self._dither_sign, self._dither_wait = -sign, 0
                self.dithers += 1
                return moved
        return None

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

    def goodput_is_of(self, seqs: int) -> bool:
        """Whether the measured goodput is of steps of about `seqs` sequences (within 1/8 of the ones it
        restarted at, or 1; goodput_by_batch restarts it, and the plan reads it, only then)."""
        return abs(seqs - self.goodput_seqs) <= max(1.0, self.goodput_seqs / 8)

    def _seen_lately(self, seen, seqs: int, window: int) -> bool:
        """Whether `seen` [(observed step, sequences)] has a step of about `seqs` sequences (within 1/8 or one)
        in the last `window` observed steps."""
        since = self._observed - window
        tol = max(1.0, seqs / 8)
        return any(i > since and abs(s - seqs) <= tol for i, s in seen)

    def _base_known(self, seqs: int) -> bool:
        """Whether an undrafted step of about `seqs` sequences fed the cost model lately (off probes)."""
        return self._seen_lately(self._base_seen, seqs, self.off_probe_every)

    def _drafted_known(self, seqs: int) -> bool:
        """Whether a step of about `seqs` sequences, at least half of them drafting, fed the cost model in the
        last draft_probe_every observed steps (draft probes)."""
        return self._seen_lately(self._drafted_seen, seqs, self.draft_probe_every)

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

    def _greedy(self, sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag_all) -> float:
        return greedy_plan(self, sched, auto, q, ctx, fixed_k, sampling, k, breakeven, lag_all)

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
            x_plan = x
            if moe:
                self.cost.experts.observe(q, sum(moe) / len(moe))
                x = x.copy()
                x[3] = sum(moe) / self.cost.ep            # fit on the measured count
            self.cost.observe(x, z, target_s, draft_s, predicted, x_plan)
            if max(q, default=2) <= 1:         # an undrafted decode step (no prompt part in it)
                self._base_seen.append((self._observed, len(q)))
            elif 2 * sum(1 for v in drafts if v) >= len(q):     # half the step's sequences or more drafting
                self._drafted_seen.append((self._observed, len(q)))
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
        if step_s > 0 and results and not (self.goodput_decode_only and sum(q) > len(results) + sum(drafts)):
            # goodput_decode_only: decode steps only (no prompt tokens in them), since a prefill-heavy step's
            # rate is what the measured one stands in for (on moe-bench a batch's first step, 64 prompts,
            # restarted goodput_by_batch's rate at 78 tokens/s, against ~560 decoding, and it took the
            # batch's whole life to climb back).
            # A ratio of averages: the average of per-step ratios would be biased upward by noisy step times.
            tok = sum(r[2] + 1 for r in results)
            n = len(results)
            if self._g_tok == 0.0 or self.goodput_by_batch and not self.goodput_is_of(n):
                # goodput_by_batch: the rate of steps of about this many sequences only (a batch's tail of a few
                # requests does not price its drafts at the full batch's rate)
                self._g_tok, self._g_s, self.goodput_seqs = tok, step_s, n
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

    @property
    def local_slope_strength(self) -> float:
        """The local line's slope prior (router/local_fit.py `slope_strength`), here for a benchmark's A/B."""
        return self.cost.local.slope_strength

    @local_slope_strength.setter
    def local_slope_strength(self, v: float) -> None:
        self.cost.local.slope_strength = v

    def stats(self) -> dict:
        return {
            "cost_model_mape": self.cost.mape,
            "cost_model_trimmed_mape": self.cost.trimmed_mape,
            "controller_fallback": self.fallback,
            "controller_overhead": self.overhead_s / self.step_s if self.step_s else None,
            "controller_k_histogram": dict(self.k_chosen),
            "controller_cooldowns": self.cooldowns,
            "controller_probes": self.probes,
            "controller_off_probes": self.off_probes,
            "controller_draft_probes": self.draft_probes,
            "controller_dithers": self.dithers,
            "controller_plans_kept": self.reused,
            "acceptance_curve": self.acceptance.global_curve.tolist(),
            "acceptance_by_kind": self.acceptance.kind_curves(),
            "acceptance_changes": self.acceptance.changes,
            "distinct_experts_beta": self.cost.experts.beta,
            "goodput_tokens_per_s": self.goodput,
            "expert_reuse_planning": bool(self.overlap),
        }
