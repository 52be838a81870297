"""scripts/lockstep.py, the step-interleaved timing the controller benchmark
relies on: engines advancing one step each in turn generate what each would
alone, the turns really alternate (rotated by round), and each engine's clock
is the sum of its own steps."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from lockstep import lockstep, own_runner  # noqa: E402

from specmoe import Engine, SamplingParams  # noqa: E402
from specmoe.drafter import SyntheticProposer  # noqa: E402
from specmoe.experts.checkpoint import bundled_model  # noqa: E402
from specmoe.experts.runner import ModelRunner  # noqa: E402


@pytest.fixture(scope="module")
def runner():
    return ModelRunner.from_pretrained(bundled_model("tiny-moe"), max_seqs=3, max_seq_len=96)


def _prompts(eng):
    return [eng._encode(t) for t in ("def main():\n", "import os\n", "class A:\n    def f(self):\n")]


def test_own_runner_shares_weights_not_cache(runner):
    r2 = own_runner(runner)
    assert r2.model is runner.model
    assert r2.cache is not runner.cache
    assert (r2.cache.num_slots, r2.cache.capacity) == (runner.cache.num_slots, runner.cache.capacity)
    assert own_runner(object()) is None


def test_lockstep_generates_what_each_engine_does_alone_and_alternates(runner):
    tok = Engine.from_pretrained(bundled_model("tiny-moe"), max_batch=1, max_seq_len=32).tokenizer
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = _prompts(Engine(runner, tok))
    ref = Engine(own_runner(runner), tok).generate(prompts, params)
    conts = {tuple(p): o.token_ids for p, o in zip(prompts, ref)}

    def make(name):     # off, an n-gram k = 2, and an oracle (SYNTHETIC, alpha 1) k = 4 that needs fewer steps
        if name == "off":
            return Engine(own_runner(runner), tok)
        if name == "k=2":
            return Engine(own_runner(runner), tok, speculation={"method": "ngram", "k": 2})
        return Engine(own_runner(runner), tok, proposer=SyntheticProposer(conts, 1.0, vocab_size=V),
                      speculation={"k": 4})
    V = runner.config.vocab_size
    names = ["off", "k=2", "k=4"]
    alone = {name: [o.token_ids for o in make(name).generate(prompts, params)] for name in names}
    engines = {name: make(name) for name in names}
    order, got = [], {name: {} for name in engines}
    for name, eng in engines.items():          # log the turns and collect each engine's tokens per request
        step = eng.step

        def logged(step=step, name=name):
            order.append(name)
            events = step()
            for _, chunk in events:
                got[name].setdefault(chunk.index, []).extend(chunk.token_ids)
            return events
        eng.step = logged
    clocks = lockstep(engines, [(prompts, params, None)], start=1)
    for name in engines:
        assert [got[name][i] for i in range(3)] == alone[name] == [o.token_ids for o in ref], name
        assert clocks[name].tokens == 3 * 24
        assert clocks[name].seconds > 0
        assert clocks[name].count == {(0, i): 24 for i in range(3)}
    # round 0 starts at the engine `start` names, round 1 at the next; while all three run, each round
    # steps every engine once
    assert order[:3] == names[1:] + names[:1]
    assert order[3:6] == names[2:] + names[:2]
    steps = {name: order.count(name) for name in names}
    assert steps["off"] > 2 * steps["k=4"]      # off needs more steps: the loop ran each to its end
    # each clock's draft lengths are its own run's: a second run of the same prompts counts the same again
    hist = clocks["k=4"].k_histogram()
    assert max(hist, key=hist.get) == 4 and set(hist) <= set(range(5))
    again = lockstep(engines, [(prompts, params, None)])
    assert again["k=4"].k_histogram() == hist
    assert again["k=4"].mean_k() == pytest.approx(sum(k * v for k, v in hist.items()) / sum(hist.values()))
    assert not any(again["off"].k_histogram().get(k, 0) for k in range(1, 9))


def test_lockstep_runs_each_engine_its_own_phases_and_times_them(runner):
    tok = Engine.from_pretrained(bundled_model("tiny-moe"), max_batch=1, max_seq_len=32).tokenizer
    engines = {"a": Engine(own_runner(runner), tok), "b": Engine(own_runner(runner), tok)}
    seen = []
    p = _prompts(engines["a"])
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    phases = {n: [(p[:1], params, lambda n=n: seen.append((n, 0))), (p, params, lambda n=n: seen.append((n, 1)))]
              for n in engines}
    clocks = lockstep(engines, phases)
    assert sorted(seen) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for c in clocks.values():
        assert c.phase_tokens == [8, 24]
        assert c.tokens == 32
        assert sum(c.phase_s) == pytest.approx(c.seconds)
        assert c.mean_k() == 0.0
