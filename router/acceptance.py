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
(or stops being so) is followed within a few steps. Counts live in one array row per request so a step's updates and
reads are vectorised.
"""

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
        self._ga = np.zeros(k_max)              # decayed global counts per position
        self._gn = np.zeros(k_max)
        self._curve: np.ndarray | None = None
        self._row: dict[int, int] = {}          # request id -> row of _a/_n
        self._a = np.zeros((16, k_max))         # decayed accepted counts per request and position
        self._n = np.zeros((16, k_max))         # decayed observed counts
        self._free: list[int] = list(range(15, -1, -1))
        self._pos = np.arange(k_max)
        self.strength = prior_strength         # the per-request prior's strength in use (see _fit_strength)
        self._since_strength = 0
        self._past: deque = deque(maxlen=32)    # (accepted, seen) at position 0 of finished requests

    @property
    def global_curve(self) -> np.ndarray:
        """(k_max,) conditional acceptance per position, all requests together."""
        if self._curve is None:
            curve, s = [], self.chain_strength
            gn = self._gn.tolist()
            for j, (a, n) in enumerate(zip(self._ga.tolist(), gn)):
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
            self._curve = np.array(curve)
        return self._curve

    def _rows(self, req_ids) -> np.ndarray:
        out = []
        for rid in req_ids:
            r = self._row.get(rid)
            if r is None:
                if not self._free:
                    old = len(self._a)
                    self._a = np.vstack([self._a, np.zeros_like(self._a)])
                    self._n = np.vstack([self._n, np.zeros_like(self._n)])
                    self._free = list(range(2 * old - 1, old - 1, -1))
                r = self._row[rid] = self._free.pop()
                self._a[r] = 0.0
                self._n[r] = 0.0
            out.append(r)
        return np.array(out, dtype=np.int64)

    def estimate(self, req_ids, explore: float = 0.0) -> np.ndarray:
        """(len(req_ids), k_max) each request's conditional acceptance per
        position. explore > 0 adds that many standard deviations of the global
        estimate to the prior (optimism where positions are rarely verified, so
        a plan keeps testing them; it fades as they are seen)."""
        rows = self._rows(req_ids)
        s = self.strength
        g = self.global_curve
        a, n = self._a[rows], self._n[rows]
        est = (a + s * g) / (n + s)
        if explore:
            # The bonus reaches a request as through a prior of the base strength, whatever strength
            # the requests' spread set: a strong prior would pass it to every request at once.
            bonus = explore * np.sqrt(g * (1 - g) / (self._gn + self.chain_strength))
            s0 = self.prior_strength
            est = np.minimum(est + bonus * (s0 / (n + s0)), 1.0)
        return est

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
        self._ga *= g
        self._gn *= g
        self._curve = None
        rows = self._rows([b[0] for b in batch])
        if len(batch) <= 8:
            # A few requests: slices (positions 0..a-1 accepted, 0..min(a+1, d)-1 seen) beat array masks.
            rd = self.request_decay
            for r, (_, d, a) in zip(rows.tolist(), batch):
                seen = min(a + 1, d)
                self._ga[:a] += 1.0
                self._gn[:seen] += 1.0
                ar, nr = self._a[r], self._n[r]
                ar[:seen] *= rd
                nr[:seen] *= rd
                ar[:a] += 1.0
                nr[:seen] += 1.0
            return
        drafted = np.array([b[1] for b in batch])
        accepted = np.array([b[2] for b in batch])
        seen = np.minimum(accepted + 1, drafted)[:, None] > self._pos      # outcome known
        hit = accepted[:, None] > self._pos
        self._ga += hit.sum(axis=0)
        self._gn += seen.sum(axis=0)
        r = np.where(seen, self.request_decay, 1.0)
        self._a[rows] = self._a[rows] * r + hit
        self._n[rows] = self._n[rows] * r + seen

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
        rows = list(self._row.values())
        a = np.concatenate([self._a[rows, 0], [p[0] for p in self._past]])
        n = np.concatenate([self._n[rows, 0], [p[1] for p in self._past]])
        seen = n >= 2
        if seen.sum() < 4:
            return
        m = float(self.global_curve[0])
        base = max(m * (1 - m), 1e-6)
        r = a[seen] / n[seen]
        between = float(np.var(r) - np.mean(base / n[seen]))
        self.strength = most if between <= base / (most + 1) else min(most, max(self.prior_strength,
                                                                             base / between - 1))

    def forget(self, req_id: int) -> None:
        r = self._row.pop(req_id, None)
        if r is not None:
            if self._n[r, 0] >= 2:
                self._past.append((float(self._a[r, 0]), float(self._n[r, 0])))
            self._free.append(r)

    def relax(self, req_id: int, factor: float) -> None:
        """Shrink a request's own evidence toward the global prior (used while it
        does not draft, so old bad luck does not bar it forever)."""
        r = self._row.get(req_id)
        if r is not None:
            self._a[r] *= factor
            self._n[r] *= factor
