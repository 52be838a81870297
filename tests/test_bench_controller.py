"""scripts/bench_controller.py's auto variants: a controller knob's A/B as a
policy of its own in the same interleaved run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_controller import KS, make_engine, parse_args, policies, variant_settings  # noqa: E402

from specmoe.drafter import SyntheticProposer  # noqa: E402
from specmoe.experts.checkpoint import bundled_model  # noqa: E402
from specmoe.experts.runner import ModelRunner  # noqa: E402
from specmoe.router.cost_model import CostModel  # noqa: E402
from specmoe.router.params import SamplingParams  # noqa: E402


def test_variant_policies_parse_to_controller_settings():
    assert policies([1, 3], ["margin=0.03"]) == ["off", "auto", "auto[margin=0.03]", "k=1", "k=3"]
    assert variant_settings("auto") == {}
    assert variant_settings("auto[margin=0.03,dither_every=8]") == {"margin": 0.03, "dither_every": 8}
    assert variant_settings("auto[learn_budget=1e-3]") == {"learn_budget": 1e-3}
    assert parse_args(["--auto-variant", "explore=0.0", "--auto-variant", "margin=0.03"]).auto_variant == [
        "explore=0.0", "margin=0.03"]
    # malformed, not a setting, fixed at construction (k_max sizes the estimator), given twice
    assert parse_args(["--auto-variant", "acceptance.request_chain=1"]).auto_variant == ["acceptance.request_chain=1"]
    for bad in (["margin"], ["margin=fast"], ["marjin=0.1"], ["k_max=4"], ["margin=0.1", "margin=0.1"],
                ["acceptance.k_max=4"], ["acceptance.margin=0.1"]):
        with pytest.raises(SystemExit):
            parse_args([x for v in bad for x in ("--auto-variant", v)])


def test_a_variant_engine_is_auto_with_its_settings(monkeypatch):
    runner = ModelRunner.from_pretrained(bundled_model("tiny-moe"), max_seqs=2, max_seq_len=64)
    V = runner.config.vocab_size

    def factory():
        return SyntheticProposer({}, 0.5, vocab_size=V)
    plain = make_engine(runner, "auto", factory)
    profiles = []
    real_profile = CostModel.profile
    monkeypatch.setattr(CostModel, "profile", lambda self, *a, **kw: profiles.append(self) or real_profile(
        self, *a, **kw))
    eng = make_engine(runner, "auto[margin=0.05,local_slope_strength=0.5,acceptance.request_chain=1]", factory,
                      plain)
    monkeypatch.undo()
    assert not profiles                         # the variant ran no profile of its own
    assert (eng.controller.margin, eng.controller.local_slope_strength) == (0.05, 0.5)
    assert eng.controller.acceptance.request_chain and not plain.controller.acceptance.request_chain
    assert (plain.controller.margin, plain.controller.local_slope_strength) == (0.01, 4.0)
    assert eng.controller.cost.local.slope_strength == 0.5      # set on the cost model it prices with
    for e in (plain, eng):                      # a request of no speculation of its own is the controller's
        assert e._request_k(SamplingParams(max_tokens=4)) == (max(KS), True)
    # the variant prices with the plain engine's profile, in a cost model of its own
    assert eng.controller.cost is not plain.controller.cost
    assert (eng.controller.cost.c == plain.controller.cost.c).all() and eng.controller.cost.knee == \
        plain.controller.cost.knee
    assert eng.controller.cost.local is not plain.controller.cost.local
    own = make_engine(runner, "auto[margin=0.05]", factory)      # no profiled engine given: its own profile
    assert not (own.controller.cost.c == plain.controller.cost.c).all()
    for e in (eng, plain, own):
        e.close()
