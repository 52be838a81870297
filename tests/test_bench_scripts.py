"""Pieces of the benchmark scripts a wrong edit would break silently: the
shapes bench_ragged times and the CostModel settings bench_profile's variants
set."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_profile import VARIANTS  # noqa: E402
from bench_ragged import shapes  # noqa: E402

from specmoe.experts.checkpoint import bundled_model  # noqa: E402
from specmoe.experts.runner import ModelRunner  # noqa: E402
from specmoe.router.cost_model import CostModel  # noqa: E402


def test_ragged_mixed_shapes_keep_the_base_tokens_in_2n_parts():
    s = shapes(16, 4, [3], (1, 3))
    assert s["base"] == [4] * 16
    assert s["deep 3"] == [7] + [4] * 15 and s["spread 3"] == [5] * 3 + [4] * 13
    for m in (1, 3):
        q = s[f"mixed {m}"]
        assert len(q) == 16 and sum(q) == 64 and len(set(q)) == 2 * m
    assert sorted(set(s["mixed 3"])) == [1, 2, 3, 5, 6, 7]


def test_profile_variants_set_existing_cost_model_settings():
    """setattr would take a misspelt name as a new attribute and profile the default unnoticed."""
    config = ModelRunner.from_pretrained(bundled_model("tiny-moe"), max_seqs=2, max_seq_len=32).config
    cm = CostModel(config, decode_tokens=9)
    assert "long" in VARIANTS and VARIANTS["long"] == {}
    for name, settings in VARIANTS.items():
        for attr, value in settings.items():
            assert hasattr(cm, attr), f"variant {name!r} sets {attr!r}, not a CostModel setting"
            assert type(getattr(cm, attr)) is type(value), (name, attr)


def test_real_drafter_variant_takes_auto_profile_and_knob():
    """bench_controller --real --auto-variant: the variant drafts with the drafter the spec names, prices with a
    copy of auto's profiled cost model (not a profile of its own) and carries the knob."""
    from bench_controller import make_engine

    runner = ModelRunner.from_pretrained(bundled_model("tiny-moe"), max_seqs=2, max_seq_len=64)
    spec = {"method": "ngram"}
    auto = make_engine(runner, "auto", None, None, spec)
    var = make_engine(runner, "auto[margin=0.25]", None, auto, spec)
    fixed = make_engine(runner, "k=3", None, None, spec)
    assert type(var.proposer).__name__ == type(auto.proposer).__name__ == type(fixed.proposer).__name__
    assert "ngram" in type(var.proposer).__name__.lower()
    assert fixed.controller is None and fixed.speculation.k == 3
    assert var.controller.margin == 0.25 and auto.controller.margin != 0.25
    assert var.controller.cost is not auto.controller.cost and auto.controller.cost.profile_seconds > 0
    x, z = auto.controller.cost.target_features([3, 1], [20, 30]), auto.controller.cost.draft_features([2, 0])
    assert var.controller.cost.predict(x, z) == auto.controller.cost.predict(x, z)


def test_step_log_records_every_step_and_groups_by_requests_sampled():
    """lockstep(keep_steps=True): one record per step whose committed tokens add up to the clock's, and
    step_summary's groups (1, 2-3, 4-7, ...) partition the sampled steps."""
    from lockstep import lockstep, own_runner, step_summary

    from specmoe import Engine, SamplingParams
    base = ModelRunner.from_pretrained(bundled_model("tiny-moe"), max_seqs=4, max_seq_len=96)
    engines = {"off": Engine(own_runner(base)),
               "auto": Engine(own_runner(base), speculation={"method": "ngram", "k": 4, "auto": True})}
    prompts = [[5, 6, 7, 8] * 4, [9, 10, 11] * 5, [12] * 9, [3, 4] * 6]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    phases = [(prompts, params, None), (prompts[:2], params, None), (prompts[:1], params, None)]   # 4, 2, 1 at once
    clocks = lockstep(engines, phases, keep_steps=True)
    for name, c in clocks.items():
        assert c.steps and sum(s["committed"] for s in c.steps) == c.tokens == 56
        assert [s["phase"] for s in c.steps] == sorted(s["phase"] for s in c.steps)
        assert abs(sum(s["ms"] for s in c.steps) - c.seconds * 1e3) < 0.001 * len(c.steps)    # ms rounded
        groups = step_summary(c.steps)
        assert [g[0] for g in groups] == ["1", "2-3", "4-7"]
        assert sum(g[1] for g in groups) == sum(1 for s in c.steps if s["sampled"])
        assert all(len(s["k"]) == s["sampled"] <= s["requests"] for s in c.steps)
    assert "goodput" in clocks["auto"].steps[-1] and "goodput" not in clocks["off"].steps[-1]
    assert all(k == 0 for s in clocks["off"].steps for k in s["k"])
