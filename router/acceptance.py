"""Acceptance estimates per request and per draft position.

Draft position j (0-based) is verified only when positions 0..j-1 were all
accepted, so what a verification of d drafts with a accepted tells is:
positions 0..a-1 accepted, position a rejected (if a < d), nothing beyond.
Each estimate is therefore the conditional acceptance P(accept j | 0..j-1
accepted), exactly the factor the value of drafting multiplies in:

    v_i(k) = 1 + sum_{j<k} prod_{m<=j} a_{i,m}

Global per-position curve: Beta counts that age with every verification, seen
or not (the workload drifts). The prior of position 0 is `prior_mean`, of
position 1 the estimate of position 0, and of a deeper position j the estimate
of j-1 times the ratio of j-1 to j-2 (capped at 1, and raised to the share of
evidence behind those two, so a trend read from a few draws counts little): a
deep position seen rarely continues the trend of the shallower ones (flat stays
flat, a falling rate keeps falling) instead of staying wherever two unlucky
draws left it, which would stop the plan from ever drafting that deep again,
or of borrowing the shallower positions' higher rate, which would draft too
deep where acceptance decays.

Per request: Beta-Bernoulli with the global curve as prior of strength
`prior_strength`, and a faster decay so a request whose text turns predictable
(or stops being so) is followed within a few steps. Two refinements were
measured and removed (docs/BENCHMARKS.md "Session 15"): scaling a request's
deeper positions by how it compares with the curve one position shallower,
and a base-strength prior for a request the curve does not describe.

Counts are plain Python
lists (k_max floats per request): a step reads and updates a few of them right
after a forward pass, when numpy's per-call cost runs 2-4x its warm figure
(an update and an estimate for one request took ~18 and ~30 us as arrays
there, where a Python loop over 8 positions takes ~1.5 us).

Proposal kinds: a drafter may report a class per proposal (`Proposal.kind`;
the n-gram drafter: the length of the matched n-gram and whether the text
followed its last proposal), which tells its quality in advance: on the
bundled model's held-out text a 3-gram match in text that followed the last
proposal was accepted at position 0 96% of the time, a 1-gram match 39%
(scripts/ngram_kinds.py). Each kind has
its own global curve, built from its own counts as the all-kinds one is, and a
request's own counts are kept per kind.
"""

import math
from collections import deque

import numpy as np

MOST_STRENGTH = 64.0    # the per-request prior's strength where requests accept alike (_fit_strength)


class _Curve:
    """Decayed global counts per position (all requests, or one proposal kind) and the curve they give."""

    __slots__ = ("a", "n", "curve", "bonus")

    def __init__(self, k: int):
        self.a, self.n = [0.0] * k, [0.0] * k
        self.curve: list | None = None      # cached until the counts change
        self.bonus: list | None = None      # one standard deviation of each position's estimate, up to the
                                            # first position seen fewer than chain_strength times (0 beyond)

    def age(self, g: float) -> None:
        a, n = self.a, self.n
        for j in range(len(a)):
            a[j] *= g
            n[j] *= g
        self.curve = None

    def add(self, d: int, acc: int) -> None:
        """One verification of d drafts with acc accepted: positions 0..acc-1 accepted, 0..min(acc+1, d)-1 seen."""
        a, n = self.a, self.n
        for j in range(min(acc + 1, d)):
            if j < acc:
                a[j] += 1.0
            n[j] += 1.0
        self.curve = None


class AcceptanceEstimator:
    def __init__(self, k_max: int, prior_mean: float = 0.6, prior_strength: float = 4.0,
                 global_decay: float = 0.99, request_decay: float = 0.95, chain_strength: float = 4.0,
                 age_cap: int | None = None, frontier_only: bool = False, change_h: float = 0.0,
                 change_odds: float = 3.0):
        """age_cap: a step's verifications age the global curves as at most this many would (None: all of
        them), so at a large batch the curves keep more than ~1 / (1 - global_decay) verifications' evidence
        (at batch 64 and 0.99 the curves aged by half every step). frontier_only: the exploration bonus
        (`rates(explore=)`) at the first position seen fewer than chain_strength times alone, not at every
        position up to it.
        change_h: the threshold of a change test on the load (0: off; see _watch): when the first-position
        outcomes of the steps since some step are more than e**change_h times likelier under odds change_odds
        times (or 1 / change_odds times) the curves' than under the curves', the curves keep as much of
        the evidence from before that step as there is after it, and the finished
        requests' rates the prior strength is fitted from are dropped: the load changed."""
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        self.k_max, self.prior_strength = k_max, prior_strength
        self.global_decay, self.request_decay = global_decay, request_decay
        self.prior_mean, self.chain_strength, self.age_cap = prior_mean, chain_strength, age_cap
        self._frontier_only = bool(frontier_only)
        self._all = _Curve(k_max)               # every verification
        self._kinds: dict = {}                  # proposal kind -> _Curve of that kind's verifications
        self._req: dict[int, dict] = {}         # request id -> {kind: (decayed accepted, decayed observed)}
        self.strength = prior_strength         # the per-request prior's strength in use (see _fit_strength)
        self._since_strength = 0
        self._past: deque = deque(maxlen=32)    # (accepted, seen, kind) at position 0 of finished requests
        self.change_h, self.change_odds = change_h, change_odds
        self.changes = 0                        # load changes the change test found
        self._up = self._down = 0.0             # the change test's statistics (log likelihood ratios) ...
        self._up_steps = self._down_steps = 0   # ... and the steps since each was last 0
        self._recent: deque = deque(maxlen=64)  # the last steps' verifications, (d, acc, kind) each

    @property
    def frontier_only(self) -> bool:
        return self._frontier_only

    @frontier_only.setter
    def frontier_only(self, v: bool) -> None:
        self._frontier_only = bool(v)
        for c in [self._all, *self._kinds.values()]:
            c.curve = None                      # the bonus is cached with the curve

    # ---- curves ----------------------------------------------------------------------------------------------

    def _chain(self, c: _Curve, first_prior: float) -> None:
        """c's curve from its counts: position 0 over first_prior, position 1
        over position 0's estimate, a deeper one over the trend of the two
        above it (see the module docstring); all with strength chain_strength."""
        curve, s = [], self.chain_strength
        gn = c.n
        for j, (a, n) in enumerate(zip(c.a, gn)):
            if j == 0:
                prior = first_prior
            elif j == 1:
                prior = curve[0]
            else:       # continue the shallower positions' trend (flat or falling), never rising,
                # as far as their own evidence supports it (a trend read from few draws is mostly noise)
                seen = min(gn[j - 1], gn[j - 2])
                trend = min(1.0, curve[j - 1] / max(curve[j - 2], 1e-6))
                prior = curve[j - 1] * trend ** (seen / (seen + 4 * s))
            curve.append((a + s * prior) / (n + s))
        c.curve = curve
        # Optimism reaches one position past those seen chain_strength times: a plan explores one draft deeper
        # than the evidence, not eight on a thin prior (a bonus at every position compounds along the survival
        # product; deeper positions keep the trend prior, which carries a high rate on by itself).
        frontier = next((j for j, n in enumerate(gn) if n < s), len(gn))
        # frontier_only: the bonus at the frontier position alone, so the seen positions' optimism does not
        # compound along the survival product of every deeper draft.
        c.bonus = [math.sqrt(g * (1 - g) / (n + s)) if j == frontier or j < frontier and not self.frontier_only
                   else 0.0 for j, (g, n) in enumerate(zip(curve, gn))]

    def _overall(self) -> _Curve:
        if self._all.curve is None:
            self._chain(self._all, self.prior_mean)
        return self._all

    def _curve(self, kind) -> _Curve:
        """The kind's curve, from its own counts as the all-kinds one is from
        all (position 0 over prior_mean, deeper ones continuing the kind's own
        trend): not over the all-kinds estimates, which the common poor kinds
        set (1-gram matches) and which had kept a rarely seen good kind (a copy
        followed) at their rate, so it was never drafted to be learned; the
        all-kinds curve for None."""
        if kind is None:
            return self._overall()
        c = self._kinds.get(kind)
        if c is None:
            c = self._kinds[kind] = _Curve(self.k_max)
        if c.curve is None:
            self._chain(c, self.prior_mean)
        return c

    @property
    def global_curve(self) -> np.ndarray:
        """(k_max,) conditional acceptance per position, all requests and kinds together."""
        return np.array(self._overall().curve)

    def kind_curves(self) -> dict:
        """Proposal kind -> its conditional acceptance per position (lists), for the kinds seen."""
        return {k: list(self._curve(k).curve) for k in sorted(self._kinds) if self._kinds[k].n[0] > 0}

    # ---- per request -----------------------------------------------------------------------------------------

    def _counts(self, rid: int, kind) -> tuple[list, list]:
        by_kind = self._req.get(rid)
        if by_kind is None:
            by_kind = self._req[rid] = {}
        c = by_kind.get(kind)
        if c is None:
            c = by_kind[kind] = ([0.0] * self.k_max, [0.0] * self.k_max)
        return c

    def rates(self, req_ids, explore: float = 0.0, kinds=None) -> list[list[float]]:
        """Per request, its conditional acceptance per position (lists; see estimate)."""
        s, s0 = self.strength, self.prior_strength
        out = []
        for i, rid in enumerate(req_ids):
            kind = kinds[i] if kinds is not None else None
            c = self._curve(kind)
            a, n = self._counts(rid, kind)
            row = [(x + s * p) / (m + s) for x, m, p in zip(a, n, c.curve)]
            if explore:
                # The bonus reaches a request as through a prior of the base strength, whatever strength
                # the requests' spread set: a strong prior would pass it to every request at once.
                row = [min(r + explore * b * (s0 / (m + s0)), 1.0) for r, m, b in zip(row, n, c.bonus)]
            out.append(row)
        return out

    def estimate(self, req_ids, explore: float = 0.0, kinds=None) -> np.ndarray:
        """(len(req_ids), k_max) each request's conditional acceptance per
        position (for the proposal kind of each, where kinds is given).
        explore > 0 adds that many standard deviations of the global estimate
        to the prior (optimism where positions are rarely verified, so a plan
        keeps testing them; it fades as they are seen), at positions up to the
        first one seen fewer than chain_strength times."""
        return np.array(self.rates(req_ids, explore, kinds), dtype=float).reshape(len(req_ids), self.k_max)

    def gains(self, req_ids, explore: float = 0.0, kinds=None) -> list[list[float]]:
        """Per request, the expected tokens gained by drafting m = 0..k_max
        tokens: cumulative sums of the survival products of its rates."""
        out = []
        for row in self.rates(req_ids, explore, kinds):
            surv, total, cum = 1.0, 0.0, [0.0]
            for r in row:
                surv *= r
                total += surv
                cum.append(total)
            out.append(cum)
        return out

    def observe(self, req_ids, drafted, accepted, kinds=None) -> None:
        """One verification per request: drafted[i] drafts, the first accepted[i]
        accepted (of a proposal of kind kinds[i], where given)."""
        batch = [(rid, int(d), int(a), kinds[i] if kinds is not None else None)
                 for i, (rid, d, a) in enumerate(zip(req_ids, drafted, accepted)) if d > 0]
        if not batch:
            return
        bad = [(d, a) for _, d, a, _ in batch if not 0 <= a <= d]
        if bad:
            raise ValueError(f"accepted {bad[0][1]} outside 0..drafted {bad[0][0]}")
        # Every position's evidence ages with every verification, seen or not: a deep
        # position the plans stopped reaching drifts back toward its trend prior
        # (the shallower positions' rate), so it is tried again if that makes it pay.
        # A kind's curve ages with that kind's verifications.
        if self.change_h:
            self._watch(batch)
        self._since_strength += 1
        if self._since_strength >= 16:
            self._fit_strength()
        cap = self.age_cap
        self._all.age(self.global_decay ** (len(batch) if cap is None else min(len(batch), cap)))
        if kinds is not None:
            per_kind: dict = {}
            for b in batch:
                if b[3] is not None:
                    per_kind[b[3]] = per_kind.get(b[3], 0) + 1
            for kind, m in per_kind.items():
                c = self._kinds.get(kind)
                if c is None:
                    c = self._kinds[kind] = _Curve(self.k_max)
                c.age(self.global_decay ** (m if cap is None else min(m, cap)))
        rd = self.request_decay
        for rid, d, a, kind in batch:
            self._all.add(d, a)
            if kind is not None:
                self._kinds[kind].add(d, a)
            ar, nr = self._counts(rid, kind)
            for j in range(min(a + 1, d)):
                ar[j] = ar[j] * rd + (1.0 if j < a else 0.0)
                nr[j] = nr[j] * rd + 1.0

    def _watch(self, batch) -> None:
        """A two-sided CUSUM test (Page 1954) on the step's first-position outcomes against the curves' rate
        there (each proposal's kind's, before this step's update): a log likelihood ratio for odds change_odds
        times the curve's, one for 1 / change_odds times, each summed over the steps since it was last below 0.
        Past change_h, the change happened after the step the statistic was last 0: the curves are shrunk to
        as many verifications at position 0 as those steps before this one hold (at least chain_strength;
        every position by the same factor), those steps' verifications are counted again over that, and both
        tests restart (this step's are added as any step's are). Kept as much as the window, the old load
        tempers a false alarm's jump: the window the test picked is the most extreme run of its steps, and a
        curve rebuilt from it alone set off a further alarm the other way. The
        curves' own aging is too slow for this: at age_cap verifications a step they keep ~50 steps of a
        load, and a new load of 32 tokens a request is over before they have followed it."""
        r = self.change_odds
        up = down = 0.0
        for _, d, acc, kind in batch:
            p = min(max(self._curve(kind).curve[0], 0.02), 0.98)
            o = p / (1.0 - p)
            pu, pd = o * r / (1.0 + o * r), o / r / (1.0 + o / r)
            if acc:
                up += math.log(pu / p)
                down += math.log(pd / p)
            else:
                up += math.log((1.0 - pu) / (1.0 - p))
                down += math.log((1.0 - pd) / (1.0 - p))
        self._up, self._down = max(0.0, self._up + up), max(0.0, self._down + down)
        self._up_steps = self._up_steps + 1 if self._up > 0 else 0
        self._down_steps = self._down_steps + 1 if self._down > 0 else 0
        fired = max((s, n) for s, n in ((self._up, self._up_steps), (self._down, self._down_steps)))
        if fired[0] <= self.change_h:
            self._recent.append([(d, acc, kind) for _, d, acc, kind in batch])
            return
        steps = list(self._recent)
        since = [v for step in steps[max(0, len(steps) - (fired[1] - 1)):] for v in step]
        keep = max(self.chain_strength, float(len(since)))
        for c in [self._all, *self._kinds.values()]:
            if c.n[0] > keep:
                c.age(keep / c.n[0])
        for d, acc, kind in since:
            self._all.add(d, acc)
            if kind is not None:
                self._kinds[kind].add(d, acc)
        self._up = self._down = 0.0
        self._up_steps = self._down_steps = 0
        self._recent.clear()
        self._past.clear()
        self.changes += 1

    def _fit_strength(self, most: float = MOST_STRENGTH) -> None:
        """Empirical Bayes: how much requests really differ. The spread of the
        first-position rates of the live requests and the last 32 finished ones
        (so a small batch has enough; within each proposal kind, around that
        kind's mean), less what their sample sizes alone would give, is the
        between-request variance v; a Beta prior with that variance has
        strength m (1 - m) / v - 1. Requests that all accept alike (v ~ 0) then
        lean on the global curve (strength up to `most`) instead of chasing
        their own few draws; requests that differ keep their own rates
        (strength down to prior_strength)."""
        self._since_strength = 0
        groups: dict = {}
        for by_kind in self._req.values():
            for kind, (a, n) in by_kind.items():
                if n[0] >= 2:
                    groups.setdefault(kind, []).append((a[0], n[0]))
        for a, n, kind in self._past:
            if n >= 2:
                groups.setdefault(kind, []).append((a, n))
        if sum(len(g) for g in groups.values()) < 4:
            return
        dev = noise = base = 0.0
        count = 0
        for kind, pts in groups.items():
            m = self._curve(kind).curve[0]
            mk = m * (1 - m)
            mean = sum(a / n for a, n in pts) / len(pts)
            for a, n in pts:
                dev += (a / n - mean) ** 2
                noise += mk / n
                base += mk
            count += len(pts)
        base = max(base / count, 1e-6)
        between = (dev - noise) / count
        self.strength = most if between <= base / (most + 1) else min(most, max(self.prior_strength,
                                                                             base / between - 1))

    def counts(self, req_id: int, kind=None) -> tuple[list, list] | None:
        """A request's (decayed accepted, decayed observed) counts per position for a kind, or None."""
        c = self._req.get(req_id, {}).get(kind)
        return (list(c[0]), list(c[1])) if c is not None else None

    def forget(self, req_id: int) -> None:
        for kind, (a, n) in self._req.pop(req_id, {}).items():
            if n[0] >= 2:
                self._past.append((a[0], n[0], kind))

    def relax(self, req_id: int, factor: float) -> None:
        """Shrink a request's own evidence toward the global prior (used while it
        does not draft, so old bad luck does not bar it forever)."""
        for c in self._req.get(req_id, {}).values():
            for v in c:
                v[:] = [x * factor for x in v]
