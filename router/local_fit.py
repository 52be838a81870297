"""A local correction of the cost model's target price at the batch running now.

The target's price is one linear model over every shape (router/cost_model.py),
its coefficients fitted to the profile and to a window of steps. Where the
machine's curve bends more than its features do, the fit is right on average
and wrong at the margin the plan decides on: on moe-bench at batch 64 and
acceptance 0.3 (`scripts/cost_fit.py --synthetic 0.3 --batch 64`, one run) the
undrafted 64-token step was priced 20% over its time and a one-token draft
for every request at 0.59 of its measured 56 ms, while auto drafted a token
every step; the slope past the knee is one figure for every batch, set mostly
by the profile's steps of 32-384 tokens.

So the residuals (measured target time minus the model's price of the step as
planned, against the current coefficients) of the window's decode steps with
about the current number of sequences (within 1/8) are fitted by a line in
the step's tokens, r = a + b (n - mean n), each step weighted by 1 / its
time squared (relative errors; other load stretches a step by a factor), the
level shrunk toward 0 as by `strength` steps of residual 0 and the slope as
by `slope_strength` steps of slope 0 spread one token per sequence either side, so
a window of one shape (a steady plan) moves the level only. A price adds
a + b (n - mean n), n held within the tokens the fit saw: beyond them the
model's own slope applies. The controller's off probes give the line its
undrafted end. Only decode steps (at most k_max + 1 tokens a sequence) are
fitted: a prefill is another regime.
"""

from collections import deque

import numpy as np


class LocalFit:
    def __init__(self, decode_tokens: int, window: int = 256, strength: float = 4.0, clip: float = 0.5,
                 slope_strength: float | None = None):
        self.decode_tokens, self.strength, self.clip = decode_tokens, strength, clip
        self._slope_strength = strength if slope_strength is None else slope_strength
        self._obs: deque = deque(maxlen=window)     # (sequences, tokens, plan-time target features, seconds)
        self._lines: dict = {}                      # sequences -> (a, b, mean n, lowest n, highest n)
        self._c = None                              # the coefficients the cached lines are residuals of
        self._new = 0                               # steps observed since the lines were cached

    @property
    def slope_strength(self) -> float:
        return self._slope_strength

    @slope_strength.setter
    def slope_strength(self, v: float) -> None:
        self._slope_strength = float(v)
        self._c = None                              # the cached lines were fitted with the old prior

    def observe(self, seqs: int, tokens: int, x: np.ndarray, seconds: float) -> None:
        if seconds > 0 and seqs > 0 and tokens <= seqs * self.decode_tokens:
            self._obs.append((int(seqs), int(tokens), x, float(seconds)))
            self._new += 1

    def line(self, seqs: int, c: np.ndarray) -> tuple | None:
        """(a, b, mean n, lowest n, highest n) for a step of `seqs` sequences, residuals against
        coefficients c, or None (no steps near it). Cached until 8 more steps are observed or c is another
        array (each plan reads it; a recomputation reads the whole window)."""
        if c is not self._c or self._new >= 8:
            self._c, self._new = c, 0
            self._lines.clear()
        elif seqs in self._lines:
            return self._lines[seqs]
        out = None
        tol = max(1.0, seqs / 8)
        pts = [o for o in self._obs if abs(o[0] - seqs) <= tol]
        if pts:
            n = np.array([o[1] for o in pts], dtype=float)
            t = np.array([o[3] for o in pts])
            p = np.array([o[2] for o in pts]) @ c
            r = np.clip(t - p, -self.clip * p, self.clip * p)
            w = 1.0 / np.maximum(t, 1e-9) ** 2
            sw = float(w.sum())
            mean_n = float((w * n).sum() / sw)
            wbar = sw / len(pts)
            a = float((w * r).sum() / (sw + self.strength * wbar))
            dn = n - mean_n
            b = float((w * dn * (r - a)).sum() / ((w * dn * dn).sum() + self._slope_strength * wbar * seqs * seqs))
            out = (a, b, mean_n, float(n.min()), float(n.max()))
        self._lines[seqs] = out
        return out

    def correction(self, seqs: int, n: float, c: np.ndarray) -> float:
        """Seconds to add to the target price (coefficients c) of a step of `seqs` sequences and n tokens."""
        ln = self.line(seqs, c) if self._obs else None
        if ln is None:
            return 0.0
        a, b, m, lo, hi = ln
        return a + b * (min(max(n, lo), hi) - m)
