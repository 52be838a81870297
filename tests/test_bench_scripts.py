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
