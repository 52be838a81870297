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
(or stops being so) is followed within a few steps. Counts are plain Python
lists (k_max floats per request): a step reads and updates a few of them right
after a forward pass, when numpy's per-call cost runs 2-4x its warm figure
(an update and an estimate for one request took ~18 and ~30 us as arrays
there, where a Python loop over 8 positions takes ~1.5 us).
"""

import math
from collections import deque

import numpy as np


class AcceptanceEstimator:
    def __init__(self, k_max: int, prior_mean: float = 0.6, prior_strength: float = 4.0,
                 global_decay: float = 0.99, request_decay: float = 0.95, chain_strength: float = 4.0):
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        self.k_max, self.prior_strength = k_max, prior_strength
        self.global_decay, self.request_decay = global_decay, request_decay
        self.prior_mean, self.chain_strength = prior_mean, chain_strength
        self._ga = [0.0] * k_max                # decayed global counts per position
        self._gn = [0.0] * k_max
        self._curve: list | None = None
        self._bonus: list | None = None         # explore bonus per position at explore = 1 (see estimate)
        self._req: dict[int, tuple[list, list]] = {}    # request id -> (decayed accepted, decayed observed)
        self.strength = prior_strength         # the per-request prior's strength in use (see _fit_strength)
        self._since_strength = 0
        self._past: deque = deque(maxlen=32)    # (accepted, seen) at position 0 of finished requests

    def _curve_list(self) -> list:
        if self._curve is None:
            curve, s = [], self.chain_strength
            gn = self._gn
            for j, (a, n) in enumerate(zip(self._ga, gn)):
                if j == 0:
                    prior = self.prior_mean
                elif j == 1:
                    prior = curve[0]
                else:       # continue the shallower positions' trend (flat or falling), never rising,
                    # as far as their own evidence supports it (a trend read from few draws is mostly noise)
                    seen = min(gn[j - 1], gn[j - 2])
                    trend = min(1.0, curve[j - 1] / max(curve[j - 2], 1e-6))
                    prior = curve[j - 1] * trend ** (seen / (seen + 4 * s))
                curve.append((a + s * prior) / (n + s))
            self._curve = curve
            self._bonus = [math.sqrt(g * (1 - g) / (n + s)) for g, n in zip(curve, gn)]
        return self._curve

    @property
    def global_curve(self) -> np.ndarray:
        """(k_max,) conditional acceptance per position, all requests together."""
        return np.array(self._curve_list())

    def _counts(self, rid: int) -> tuple[list, list]:
        c = self._req.get(rid)
        if c is None:
            c = self._req[rid] = ([0.0] * self.k_max, [0.0] * self.k_max)
        return c

    def rates(self, req_ids, explore: float = 0.0) -> list[list[float]]:
        """Per request, its conditional acceptance per position (lists; see estimate)."""
        g = self._curve_list()
        s, s0 = self.strength, self.prior_strength
        bonus = [explore * b for b in self._bonus] if explore else None
        out = []
        for rid in req_ids:
            a, n = self._counts(rid)
            if bonus is None:
                out.append([(x + s * p) / (m + s) for x, m, p in zip(a, n, g)])
            else:
                # The bonus reaches a request as through a prior of the base strength, whatever strength
                # the requests' spread set: a strong prior would pass it to every request at once.
                out.append([min((x + s * p) / (m + s) + b * (s0 / (m + s0)), 1.0)
                            for x, m, p, b in zip(a, n, g, bonus)])
        return out

    def estimate(self, req_ids, explore: float = 0.0) -> np.ndarray:
        """(len(req_ids), k_max) each request's conditional acceptance per
        position. explore > 0 adds that many standard deviations of the global
        estimate to the prior (optimism where positions are rarely verified, so
        a plan keeps testing them; it fades as they are seen)."""
        return np.array(self.rates(req_ids, explore), dtype=float).reshape(len(req_ids), self.k_max)

    def gains(self, req_ids, explore: float = 0.0) -> list[list[float]]:
        """Per request, the expected tokens gained by drafting m = 0..k_max
        tokens: cumulative sums of the survival products of its rates."""
        out = []
        for row in self.rates(req_ids, explore):
            surv, total, cum = 1.0, 0.0, [0.0]
            for r in row:
                surv *= r
                total += surv
                cum.append(total)
            out.append(cum)
        return out

    def observe(self, req_ids, drafted, accepted) -> None:
        """One verification per request: drafted[i] drafts, the first accepted[i] accepted."""
        batch = [(rid, int(d), int(a)) for rid, d, a in zip(req_ids, drafted, accepted) if d > 0]
        if not batch:
            return
        bad = [(d, a) for _, d, a in batch if not 0 <= a <= d]
        if bad:
            raise ValueError(f"accepted {bad[0][1]} outside 0..drafted {bad[0][0]}")
        # Every position's evidence ages with every verification, seen or not: a deep
        # position the plans stopped reaching drifts back toward its trend prior
        # (the shallower positions' rate), so it is tried again if that makes it pay.
        self._since_strength += 1
        if self._since_strength >= 16:
            self._fit_strength()
        g = self.global_decay ** len(batch)
        ga, gn = self._ga, self._gn
        for j in range(self.k_max):
            ga[j] *= g
            gn[j] *= g
        self._curve = None
        rd = self.request_decay
        for rid, d, a in batch:     # positions 0..a-1 accepted, 0..min(a+1, d)-1 seen (outcome known)
            ar, nr = self._counts(rid)
            for j in range(min(a + 1, d)):
                hit = 1.0 if j < a else 0.0
                ga[j] += hit
                gn[j] += 1.0
                ar[j] = ar[j] * rd + hit
                nr[j] = nr[j] * rd + 1.0

    def _fit_strength(self, most: float = 64.0) -> None:
        """Empirical Bayes: how much requests really differ. The spread of the
        first-position rates of the live requests and the last 32 finished ones
        (so a small batch has enough), less what their sample sizes alone would
        give, is the between-request variance v; a Beta prior with that
        variance has strength m (1 - m) / v - 1. Requests that all accept alike
        (v ~ 0) then lean on the global curve (strength up to `most`) instead of
        chasing their own few draws; requests that differ keep their own rates
        (strength down to prior_strength)."""
        self._since_strength = 0
        a = np.array([c[0][0] for c in self._req.values()] + [p[0] for p in self._past])
        n = np.array([c[1][0] for c in self._req.values()] + [p[1] for p in self._past])
        seen = n >= 2
        if seen.sum() < 4:
            return
        m = float(self._curve_list()[0])
        base = max(m * (1 - m), 1e-6)
        r = a[seen] / n[seen]
        between = float(np.var(r) - np.mean(base / n[seen]))
        self.strength = most if between <= base / (most + 1) else min(most, max(self.prior_strength,
                                                                             base / between - 1))

    def counts(self, req_id: int) -> tuple[list, list] | None:
        """A request's (decayed accepted, decayed observed) counts per position, or None."""
        c = self._req.get(req_id)
        return (list(c[0]), list(c[1])) if c is not None else None

    def forget(self, req_id: int) -> None:
        c = self._req.pop(req_id, None)
        if c is not None and c[1][0] >= 2:
            self._past.append((c[0][0], c[1][0]))

    def relax(self, req_id: int, factor: float) -> None:
        """Shrink a request's own evidence toward the global prior (used while it
        does not draft, so old bad luck does not bar it forever)."""
        c = self._req.get(req_id)
        if c is not None:
            for v in c:
                v[:] = [x * factor for x in v]
