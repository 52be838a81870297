"""The cost model's local correction (router/local_fit.py) and the
controller's off probes: synthetic timings whose truth the test knows."""

import numpy as np
import pytest

from specmoe.router.cost_model import CostModel
from specmoe.router.local_fit import LocalFit
from specmoe.router.plan_search import first_draft_loss

from test_controller import _controller, _moe_config, linear, runner, moe_path, sched_for  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

C = linear([5e-3, 1e-4, 1e-4, 0, 0, 0])         # fixed, per sequence, per token: a step of B x q is cheap to price


def _rows(cm, B, q, ctx=40):
    return cm.target_features([q] * B, [ctx] * B)


def test_local_line_recovers_what_the_features_miss():
    """Steps of 8 sequences x 1-9 tokens whose true time is the model's price
    plus a line in tokens (2 ms + 0.1 ms per token past 40), 2% noise: the
    fitted line is that one (slope within 20%, once the shrinkage toward 0 of
    the few-token spread is allowed for), held flat past the tokens it saw;
    prefills are not fitted, and another batch size gets no correction."""
    cm = CostModel(_moe_config())
    lf = LocalFit(decode_tokens=9)
    rng = np.random.default_rng(0)
    for i in range(120):
        q = 1 + i % 9
        x = _rows(cm, 8, q)
        n = 8 * q
        lf.observe(8, n, x, (float(C @ x) + 2e-3 + 1e-4 * (n - 40)) * rng.lognormal(0, 0.02))
    lf.observe(8, 8 * 64, _rows(cm, 8, 64), 1.0)           # a prefill: another regime, not fitted
    a, b, m, lo, hi = lf.line(8, C)
    assert (lo, hi) == (8, 72)
    spread = np.var([8 * (1 + i % 9) for i in range(120)]) * 120
    shrink = spread / (spread + 4 * 64)                     # the slope's pull toward 0 (strength 4, 1 token/seq)
    assert abs(b / (1e-4 * shrink) - 1) < 0.2, (b, shrink)
    assert abs(lf.correction(8, m, C) - (2e-3 + 1e-4 * (m - 40))) < 4e-4
    assert lf.correction(8, 500, C) == pytest.approx(lf.correction(8, hi, C))
    assert lf.line(32, C) is None and lf.correction(32, 64, C) == 0.0
    # one shape only (a steady plan): the level moves, the slope does not
    one = LocalFit(decode_tokens=9)
    for _ in range(20):
        one.observe(8, 16, _rows(cm, 8, 2), float(C @ _rows(cm, 8, 2)) + 1e-3)
    a1, b1, *_ = one.line(8, C)
    assert b1 == 0.0 and a1 == pytest.approx(1e-3 * 20 / 24)


def test_slope_prior_is_its_own_strength():
    """Two off probes (8 sequences x 1 token) among 30 drafted steps (x 2
    tokens), the drafted step truly costing 1 ms more than the model says:
    the slope learned is the data's spread over (spread + slope_strength
    pseudo-steps of one token per sequence either side), whatever the level's
    strength."""
    cm = CostModel(_moe_config())
    pts = [(8, _rows(cm, 8, 1))] * 2 + [(16, _rows(cm, 8, 2))] * 30
    got = {}
    for s in (4.0, 1.0, 0.25):
        lf = LocalFit(decode_tokens=9, strength=4.0, slope_strength=s)
        for n, x in pts:
            lf.observe(8, n, x, float(C @ x) + 1e-3 * (n - 8) / 8)    # the 8 drafted tokens: 1 ms unpriced
        a, b, m, lo, hi = lf.line(8, C)
        ns = np.array([n for n, _ in pts], dtype=float)
        w = 1.0 / np.array([float(C @ x) + 1e-3 * (n - 8) / 8 for n, x in pts]) ** 2
        mean = (w * ns).sum() / w.sum()
        spread = (w * (ns - mean) ** 2).sum()
        shrink = spread / (spread + s * w.mean() * 64)
        assert b == pytest.approx(1e-3 / 8 * shrink, rel=0.05), (s, b, shrink)
        got[s] = b
    assert got[0.25] > got[1.0] > got[4.0]
    assert LocalFit(decode_tokens=9, strength=2.0).slope_strength == 2.0       # defaults to the level's


def test_controller_sets_the_local_slope_strength(runner):
    ctl = _controller(runner, [5e-3, 1e-4, 1e-4, 0, 0, 0], [0, 0, 0, 0, 0], acceptance=0.3)
    assert ctl.local_slope_strength == ctl.cost.local.strength
    ctl.local_slope_strength = 0.5
    assert ctl.cost.local.slope_strength == 0.5 and ctl.cost.local._c is None


def test_prediction_adds_the_local_correction():
    cm = CostModel(_moe_config())
    cm.c = C.copy()
    x = _rows(cm, 4, 3)
    z = np.zeros(5)
    before = cm.predict(x, z)
    for _ in range(10):
        cm.local.observe(4, 12, x, float(C @ x) * 1.5)
    assert cm.predict(x, z) == pytest.approx(before + cm.local.correction(4, 12, cm.c))
    assert cm.predict(x, z) > 1.3 * before


def test_plan_stops_a_draft_the_measured_steps_show_does_not_pay(runner):
    """Acceptance 0.3 at batch 8, a model pricing the drafted step (16 tokens)
    12% over the undrafted one: the plan drafts a token for every request.
    Steps measured where the drafted step costs 1.5x the undrafted (which the
    model prices right): the local line makes it 1.3x or more, and the plan
    drafts nothing."""
    ctl = _controller(runner, [5e-3, 1e-4, 1e-4, 0, 0, 0], [0, 0, 0, 0, 0], acceptance=0.3)
    cm = ctl.cost
    s = sched_for(8, start_id=300)
    ctl.plan(s, lambda e: True)
    assert all(e.k >= 1 for e in s), [e.k for e in s]
    base, drafted = _rows(cm, 8, 1, 39), _rows(cm, 8, 2, 39)
    for _ in range(20):
        cm.local.observe(8, 8, base, float(cm.c @ base))
        cm.local.observe(8, 16, drafted, float(cm.c @ base) * 1.5)
    assert cm.predict(drafted, np.zeros(5)) / cm.predict(base, np.zeros(5)) > 1.3
    ctl._last = None
    s = sched_for(8, start_id=300)
    ctl.plan(s, lambda e: True)
    assert [e.k for e in s] == [0] * 8


def _run(ctl, steps, p, B=4, start_id=500):
    """Plan and observe `steps` steps (times as the model prices them, each
    draft accepted with probability p up to the first miss); the steps where
    the plan's drafts were withheld (off probes) by index."""
    off = []
    rng = np.random.default_rng(5)
    for i in range(steps):
        s = sched_for(B, start_id=start_id)
        n0 = ctl.off_probes
        ctl.plan(s, lambda e: True)
        if ctl.off_probes > n0:
            assert all(e.k == 0 for e in s)
            off.append(i)
        q = [1 + e.k for e in s]
        t = ctl.cost.predict(ctl.cost.target_features(q, [39] * B), np.zeros(5))
        acc = [int(np.argmin(np.append(rng.random(e.k) < p, False))) for e in s]
        ctl.observe([(e.req.id, e.k, a, True) for e, a in zip(s, acc)], q, [e.k for e in s], target_s=t,
                    draft_s=0.0, step_s=t, distinct=None)
    return off


def test_off_probes_measure_the_undrafted_step_of_a_marginal_plan(runner):
    """A plan that drafts for a small expected gain (acceptance 0.3, a draft
    nearly as dear as it is worth) runs one step undrafted, learned from,
    every `off_probe_every` observed steps; a plan whose drafts clearly pay
    (acceptance 0.95, drafts nearly free) never does."""
    ctl = _controller(runner, [5e-3, 1e-4, 4e-4, 0, 0, 0], [0, 0, 0, 0, 0], acceptance=0.3)
    ctl.cost.refit = lambda: None
    ctl.max_backoff = ctl.start_backoff = 10 ** 6          # no cool-down probes in the way
    fed = []
    inner = ctl.cost.observe
    ctl.cost.observe = lambda *a: fed.append(ctl._observed) or inner(*a)
    off = _run(ctl, 140, 0.3)
    assert 1 < ctl.plan_gain < 1 + ctl.off_probe_gain
    assert 2 <= len(off) <= 3 and all(b - a >= ctl.off_probe_every for a, b in zip(off, off[1:])), off
    assert all(i + 1 in fed for i in off)                 # each off probe fed the cost model
    assert sum(ctl.k_chosen[k] for k in ctl.k_chosen if k) > 100 * 4     # the plan drafted throughout
    good = _controller(runner, [5e-3, 1e-4, 1e-6, 0, 0, 0], [0, 0, 0, 0, 0], acceptance=0.95)
    good.cost.refit = lambda: None
    assert _run(good, 140, 0.95) == [] and good.off_probes == 0 and good.plan_gain > 1.5



def test_draft_probes_measure_the_drafted_step_of_a_marginal_quiet_plan(runner):
    """The mirror of an off probe (draft_probe_every > 0; off by default): a
    plan that drafts nothing while every request drafting one token would
    lose less than off_probe_gain (as priced) runs one step with a draft for
    every request, learned from, at most once in draft_probe_every observed
    steps (the first as soon as one is due, whenever the knob was set), and
    the step after it plans again rather than staying quiet; where
    a draft clearly cannot pay (acceptance 0) none runs, nor with the default."""
    def run(ctl, steps, want=(1, 1, 1, 1)):
        probes, rng = [], np.random.default_rng(5)
        for i in range(steps):
            s = sched_for(4, start_id=500)
            n0 = ctl.draft_probes
            ctl.plan(s, lambda e: True)
            if ctl.draft_probes > n0:
                assert [e.k for e in s] == list(want) and ctl._decision.learn and not ctl.quiet
                probes.append(i)
            else:
                assert sum(e.k for e in s) <= 1          # a request's own probe at most
            q = [1 + e.k for e in s]
            t = ctl.cost.predict(ctl.cost.target_features(q, [39] * 4), ctl.cost.draft_features([e.k for e in s]))
            acc = [int(e.k > 0 and rng.random() < 0.3) for e in s]
            ctl.observe([(e.req.id, e.k, a, True) for e, a in zip(s, acc)], q, [e.k for e in s], target_s=t,
                        draft_s=0.0, step_s=t, distinct=None)
        return probes

    def make(acceptance, every):
        ctl = _controller(runner, [5e-3, 1e-4, 8e-4, 0, 0, 0], [0, 0, 0, 0, 0], acceptance=acceptance)
        ctl.cost.refit = lambda: None
        ctl.max_backoff = ctl.start_backoff = 10 ** 6          # no per-request probes in the way
        ctl.draft_probe_every = every
        return ctl
    ctl = make(0.3, 16)
    one = {i: 1 for i in range(4)}
    assert 0 < first_draft_loss(ctl, sched_for(4), one, [1.0] * 4, [39.0] * 4, [0] * 4) < ctl.off_probe_gain
    probes = run(ctl, 120)
    assert len(probes) >= 3 and all(b - a >= 16 for a, b in zip(probes, probes[1:])), probes
    assert probes[0] < 16, probes        # the knob set after construction: no wait for a first probe
    cool = make(0.3, 16)
    cool._new_state(503).cooldown = 10 ** 6                 # request 3 cooled down: the probes leave it out
    assert len(run(cool, 120, want=(1, 1, 1, 0))) >= 3
    assert run(make(0.0, 16), 120) == [] and run(make(0.3, 0), 120) == []


def _simulate(ctl, truth_s, steps, acceptance=0.7, B=8, seed=5, caps=None, learned=None):
    """A steady load of B requests (caps per request, default 8): plan, verify at `acceptance` per position,
    observe truth_s(x, z); returns (the plan's k per request, the k that ran) per step, and appends to
    `learned` whether each step fed the cost model."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        s = sched_for(B, start_id=500)
        for e, c in zip(s, caps or [8] * B):
            e.k = c
        ctl.plan(s, lambda e: True)
        ks = [e.k for e in s]
        planned = list(ctl._last[2]) if ctl._last is not None else ks
        if learned is not None:
            learned.append(ctl._decision.learn)
        acc = []
        for k in ks:
            a = 0
            while a < k and rng.random() < acceptance:
                a += 1
            acc.append(a)
        x, z = ctl.cost.target_features([1 + k for k in ks], [39] * B), ctl.cost.draft_features(ks)
        t = truth_s(x, z)
        ctl.observe([(e.req.id, k, a, True) for e, k, a in zip(s, ks, acc)], [1 + k for k in ks], ks,
                    target_s=t, draft_s=0.0, step_s=t, distinct=None)
        out.append((planned, ks))
    return out


def test_dither_moves_every_drafting_request_by_one_in_turn(runner):
    """1 in dither_every drafting steps runs the plan one draft deeper or
    shallower for every drafting request (+1 and -1 alternately, within the
    caps: a request capped at its planned depth only goes down), a cooled-down
    request stays at 0, and that step feeds the cost model; dither_every = 0
    (the default) never moves the plan."""
    truth = linear([5e-3, 1e-4, 3e-4, 0, 0, 0])
    ctl = _controller(runner, truth, [0, 0, 0, 0, 0], acceptance=0.7)
    ctl.dither_every, ctl.off_probe_every = 4, 0
    ctl._new_state(507).cooldown = 10 ** 6                   # request 7: cooled down all along (plans 0)
    caps = [8] * 6 + [2, 8]                                  # request 6: capped at about the plan's depth
    learned = []
    runs = _simulate(ctl, lambda x, z: float(truth @ x), 64, caps=caps, learned=learned)
    moved = [i for i, (p, r) in enumerate(runs) if p != r]
    assert 64 // 4 - 2 <= len(moved) <= 64 // 4 + 1 and ctl.dithers == len(moved)
    assert min(b - a for a, b in zip(moved, moved[1:])) == 4                 # 1 in 4, no closer
    assert all(learned[i] for i in moved)
    signs = []
    for i in moved:
        planned, ran = runs[i]
        diff = [b - a for a, b in zip(planned, ran)]
        assert planned[7] == 0 and diff[7] == 0                          # only drafting requests move
        assert len({d for d, k in zip(diff[:6], planned) if k}) == 1     # all of them alike
        sign = diff[0]
        assert ran[6] == (min(planned[6] + 1, 2) if sign > 0 else planned[6] - 1)
        signs.append(sign)
    assert set(signs) == {1, -1} and sum(a != b for a, b in zip(signs, signs[1:])) >= len(signs) - 3
    assert any(runs[i][0][6] == 2 and runs[i][1][6] == 2 for i in moved)   # a +1 the cap held
    still = _controller(runner, truth, [0, 0, 0, 0, 0], acceptance=0.7)
    still.off_probe_every = 0
    assert still.dither_every == 0                   # the default: off
    assert all(p == r for p, r in _simulate(still, lambda x, z: float(truth @ x), 64)) and still.dithers == 0


def test_refits_learn_a_mispriced_token_without_dithering(runner):
    """Why the dither stays off: the model prices a verified token at 0.1 ms
    where it costs 0.4 ms, and on a steady load without dithering the refits
    still learn the price of one more draft per request (the plan moves
    through shapes while it learns), so the plan ends shallower than it began."""
    model = linear([5e-3, 1e-4, 1e-4, 0, 0, 0])
    truth = linear([5e-3, 1e-4, 4e-4, 0, 0, 0])
    B = 8
    ctl = _controller(runner, model, [0, 0, 0, 0, 0], acceptance=0.8)
    assert ctl.dither_every == 0
    runs = _simulate(ctl, lambda x, z: float(truth @ x), 200, acceptance=0.8, B=B)
    cm = ctl.cost
    u = max(int(np.median(runs[-1][0])), 1)
    x0, x1 = cm.target_features([u] * B, [39] * B), cm.target_features([u + 1] * B, [39] * B)
    z0, z1 = cm.draft_features([u - 1] * B), cm.draft_features([u] * B)
    learned = cm.predict(x1, z1) - cm.predict(x0, z0)
    assert abs(learned / (4e-4 * B) - 1) < 0.15, learned
    assert np.mean([np.mean(p) for p, _ in runs[-50:]]) < np.mean(runs[0][0]) - 1
