"""scripts/bench_controller.py's auto variants (a controller knob's A/B as a
policy of its own in the same interleaved run) and its traces' per-phase rows
and table."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_controller  # noqa: E402
import torch  # noqa: E402
from bench_controller import (KS, TRACES, grid_rows, main, make_engine, parse_args, policies,  # noqa: E402
                              print_phases, trace_rows, variant_settings)

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
    assert parse_args(["--auto-variant", "acceptance.change_h=8"]).auto_variant == ["acceptance.change_h=8"]
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
    eng = make_engine(runner, "auto[margin=0.05,local_slope_strength=0.5,acceptance.change_h=8]", factory,
                      plain)
    monkeypatch.undo()
    assert not profiles                         # the variant ran no profile of its own
    assert (eng.controller.margin, eng.controller.local_slope_strength) == (0.05, 0.5)
    assert eng.controller.acceptance.change_h == 8 and not plain.controller.acceptance.change_h
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


TRACE_KEYS = {"model", "ep", "trace", "phase", "batch", "alpha", "policy", "tokens_per_s"}


def phase_table(text: str) -> dict:
    """print_phases' table as {phase index: [its cells after the phase's]}."""
    return {int(line.split("|")[1].split(":")[0]): [c.strip() for c in line.split("|")[2:-1]]
            for line in text.splitlines() if line.startswith("| ") and ": (" in line.split("|")[1]}


def test_trace_rows_are_one_per_policy_and_phase_and_stay_out_of_the_heatmap():
    phases = [TRACES["hetero"][0], TRACES["hetero"][1], (3, (0.9, 0.5, 0.2))]
    per_phase = {p: [100.0 * (j + 1) + 7.5 * i for i in range(len(phases))]
                 for j, p in enumerate(policies([1, 4], ["margin=0.03"]))}
    rows = trace_rows("moe-bench", 2, "hetero", phases, per_phase)
    assert len(rows) == len(per_phase) * len(phases)
    assert {(r["policy"], r["phase"]) for r in rows} == {(p, i) for p in per_phase for i in range(len(phases))}
    for r in rows:
        assert set(r) == TRACE_KEYS                 # no "decay" / "mean_k": not a grid cell's row
        b, a = phases[r["phase"]]
        assert (r["model"], r["ep"], r["trace"], r["batch"]) == ("moe-bench", 2, "hetero", b)
        assert r["alpha"] == (list(a) if isinstance(a, tuple) else a)
        assert r["tokens_per_s"] == per_phase[r["policy"]][r["phase"]]
    assert [r["alpha"] for r in rows if r["policy"] == "off"] == [0.9, [0.9, 0.2], [0.9, 0.5, 0.2]]
    assert json.loads(json.dumps(rows)) == rows     # tuples of alphas written as lists, read back the same
    grid = {"model": "moe-bench", "ep": 1, "batch": 4, "alpha": 0.5, "decay": 1.0, "policy": "auto",
            "tokens_per_s": 1.0, "tpot_ms": 1.0, "mean_k": 2.0}
    real = {**grid, "model": "tiny-moe (bundled)", "drafter": "ngram", "alpha": None, "decay": None}
    assert grid_rows(rows + [grid, real] + rows) == [grid]


def test_print_phases_ratios_are_the_inputs(capsys):
    phases = [(1, 0.9), (16, 0.3), (4, (0.9, 0.2))]
    per_phase = {"off": [50.0, 400.0, 120.0], "auto": [90.0, 380.0, 150.0], "auto[margin=0.03]": [80.0, 390.0, 140.0],
                 "k=1": [70.0, 410.0, 130.0], "k=4": [110.0, 300.0, 160.0]}
    fixed = [p for p in per_phase if not p.startswith("auto")]
    best_phase = [max(fixed, key=lambda p: per_phase[p][i]) for i in range(len(phases))]
    assert best_phase == ["k=4", "k=1", "k=4"]      # each fastest fixed policy differs from auto's column
    print_phases(phases, per_phase, best_phase)
    out = capsys.readouterr().out
    assert "| auto | auto[margin=0.03] |" in out
    table = phase_table(out)
    assert sorted(table) == list(range(len(phases)))
    for i, (b, a) in enumerate(phases):
        assert f"| {i}: ({b}, {a}) |" in out
        bp, auto = best_phase[i], per_phase["auto"][i]
        assert table[i] == [f"{per_phase['off'][i]:.1f}", f"{per_phase[bp][i]:.1f} ({bp})", f"{auto:.1f}",
                            f"{per_phase['auto[margin=0.03]'][i]:.1f}", f"{auto / per_phase[bp][i]:.2f}x",
                            f"{auto / per_phase['off'][i]:.2f}x"]


def test_trace_only_run_writes_the_per_phase_rows_it_prints(tiny_mixtral, tmp_path, monkeypatch, capsys):
    """main --trace-only on the tiny Mixtral (standing in for moe-bench): the JSON holds the traces' rows
    only, one a policy and phase of the phases --batch keeps, each the tokens/s its per-phase table prints."""
    monkeypatch.setattr(bench_controller, "build_checkpoint", lambda out, seed: tiny_mixtral)
    threads = torch.get_num_threads()               # main sets one thread for the whole process
    try:
        assert main(["--model", "moe-bench", "--trace-only", "--trace-kind", "mixed,hetero", "--batch", "2",
                     "--ks", "1", "--reps", "1", "--new-tokens", "4", "--min-tokens", "4", "--prompt-len", "8",
                     "--auto-variant", "margin=0.03", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "r.json").read_text())
    assert grid_rows(rows) == [] and all(set(r) == TRACE_KEYS for r in rows)
    names = ["off", "auto", "auto[margin=0.03]", "k=1"]
    tables = out.split("| phase (batch, alpha) |")[1:]
    assert len(tables) == 2
    for kind, text in zip(("mixed", "hetero"), tables):
        phases = [(b, a) for b, a in TRACES[kind] if b <= 2]
        mine = [r for r in rows if r["trace"] == kind]
        assert [(r["policy"], r["phase"]) for r in mine] == [(p, i) for p in names for i in range(len(phases))]
        table = phase_table(text.split("\n\n")[0])
        for r in mine:
            b, a = phases[r["phase"]]
            assert (r["model"], r["ep"], r["batch"]) == ("moe-bench", 1, b) and r["tokens_per_s"] > 0
            assert r["alpha"] == (list(a) if isinstance(a, tuple) else a)
            cells, v = table[r["phase"]], f"{r['tokens_per_s']:.1f}"
            if r["policy"] == "off":
                assert cells[0] == v
            elif r["policy"].startswith("auto"):
                assert cells[1 + names.index(r["policy"])] == v     # columns: off, fastest fixed, the autos
            if cells[1].endswith(f" ({r['policy']})"):
                assert cells[1] == f"{v} ({r['policy']})"
    assert any(isinstance(r["alpha"], list) for r in rows if r["trace"] == "hetero")
