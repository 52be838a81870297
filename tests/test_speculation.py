"""Speculative decoding end to end through the Engine: lossless greedy output
for every drafter and k, ragged k in one step, preemption and chunked prefill,
streaming and stop conditions, seeded sampling. The plain (speculation off)
engine output is itself checked against transformers in test_families.py."""

import pytest

from specmoe import Engine, SamplingParams
from specmoe.drafter import SyntheticProposer
from specmoe.experts.runner import ModelRunner

from _helpers import assert_same_or_near_tie  # noqa: E402  (tests/, on sys.path via conftest)

V = 128
PROMPTS = [[5, 9, 17, 5, 9, 17, 5, 9], [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 3], [7, 7, 7, 7],
           [100, 3, 100, 4, 100, 5, 100, 3, 100], [11, 22, 33, 44, 55, 66, 77, 88, 99, 11, 22, 33]]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def target(tiny_mixtral):
    return tiny_mixtral


@pytest.fixture(scope="module")
def draft(tiny_llama_draft):
    return tiny_llama_draft


@pytest.fixture(scope="module")
def plain(target):
    """Greedy outputs without speculation, and the target logits along them (for near-tie checks)."""
    eng = Engine.from_pretrained(target, max_batch=8, max_seq_len=256)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=64, ignore_eos=True))
    return eng, [o.token_ids for o in outs]


def spec_engine(kind, k, target, draft, plain_outs=None, alpha=0.7, **engine_options):
    if kind == "synthetic":
        runner = ModelRunner.from_pretrained(target, max_seqs=8, max_seq_len=256)
        conts = {tuple(p): o for p, o in zip(PROMPTS, plain_outs)}
        return Engine(runner, proposer=SyntheticProposer(conts, alpha, vocab_size=V, seed=3),
                      speculation={"k": k})
    spec = {"ngram": {"method": "ngram", "k": k},
            "draft_model": {"method": "draft_model", "k": k, "draft_model": str(draft)},
            "draft_model_confident": {"method": "draft_model", "k": k, "draft_model": str(draft),
                                      "min_confidence": 0.5},
            "layer_skip": {"method": "layer_skip", "k": k, "layers": 2}}[kind]
    return Engine.from_pretrained(target, max_batch=8, max_seq_len=256, speculation=spec, **engine_options)


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("kind", ["ngram", "draft_model", "draft_model_confident", "layer_skip", "synthetic"])
def test_greedy_speculation_is_lossless(kind, k, target, draft, plain):
    ref_eng, want = plain
    eng = spec_engine(kind, k, target, draft, want)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    batch = eng.generate(PROMPTS, params)                          # a ragged batch of 5
    single = eng.generate([PROMPTS[1]], params)[0]                 # batch 1
    for p, w, o in zip(PROMPTS, want, batch):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    assert_same_or_near_tie(ref_eng, PROMPTS[1], want[1], single.token_ids)
    drafted = sum(o.stats.draft_tokens for o in batch)
    accepted = sum(o.stats.accepted_tokens for o in batch)
    assert drafted > 0 and 0 <= accepted <= drafted
    if kind == "draft_model_confident" and k > 1:      # the confidence stop cut many steps short of k
        assert drafted < 0.8 * k * sum(o.stats.steps for o in batch)       # (plain draft_model: ~0.97)
    for o in batch:
        # every step commits accepted + 1 tokens (the last step may be cut at max_tokens)
        assert o.stats.steps <= 64 - o.stats.accepted_tokens + 1 and len(o.token_ids) == 64
    if kind == "synthetic":  # alpha 0.7 per position: a step accepts a prefix, E[accepted] = sum_j 0.7^j
        expected = sum(0.7 ** j for j in range(1, k + 1)) / k
        assert abs(accepted / drafted - expected) < 0.12, (accepted / drafted, expected)


def test_always_wrong_drafter_reproduces_plain_and_oracle_accepts_everything(target, draft, plain):
    _, want = plain
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    wrong = spec_engine("synthetic", 4, target, draft, want, alpha=0.0).generate(PROMPTS, params)
    assert [o.token_ids for o in wrong] == want
    assert all(o.stats.accepted_tokens == 0 and o.stats.draft_tokens > 0 for o in wrong)
    oracle = spec_engine("synthetic", 4, target, draft, want, alpha=1.0).generate(PROMPTS, params)
    assert [o.token_ids for o in oracle] == want
    for o in oracle:
        assert o.stats.accepted_tokens == o.stats.draft_tokens > 0
        assert o.stats.steps == 13        # every step, the prefill too, commits 4 accepted + 1 bonus: 13 x 5 >= 64


def test_ragged_k_including_zero_in_one_step(target, draft, plain):
    _, want = plain
    eng = spec_engine("draft_model", 4, target, draft)
    ks = [{"k": 0}, "off", {"k": 2}, None, {"k": 7}]
    params = [SamplingParams(max_tokens=64, ignore_eos=True, speculation=s) for s in ks]
    outs = eng.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == want
    assert outs[0].stats.draft_tokens == outs[1].stats.draft_tokens == 0
    assert outs[0].stats.steps == 64
    assert all(o.stats.draft_tokens > 0 for o in outs[2:])
    with pytest.raises(ValueError, match=r"needs a drafter this engine does not run"):
        eng.generate(PROMPTS[:1], SamplingParams(speculation={"method": "ngram", "k": 2}))
    with pytest.raises(ValueError, match=r"speculation method 'synthetic' unknown.*Python benchmarks only"):
        Engine.from_pretrained(target, speculation={"method": "synthetic", "k": 2})


@pytest.mark.parametrize("kind", ["ngram", "layer_skip"])
def test_preemption_and_chunked_prefill_keep_outputs(kind, target, draft, plain):
    _, want = plain
    spec = {"method": "ngram", "k": 3} if kind == "ngram" else {"method": "layer_skip", "k": 3, "layers": [0, 2]}
    # KV budget of 100 tokens for 5 sequences of up to 76: requests are preempted and recomputed;
    # a token budget of 7 splits every prompt longer than that over several steps.
    eng = Engine.from_pretrained(target, max_batch=5, max_seq_len=128, speculation=spec,
                                 max_tokens_per_step=7, kv_budget_tokens=100)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=64, ignore_eos=True))
    assert [o.token_ids for o in outs] == want
    assert sum(o.stats.preemptions for o in outs) > 0
    assert eng.runner.cache.free_slots == 5


def test_more_prompts_than_slots_join_as_others_leave(target, plain):
    _, want = plain
    eng = Engine.from_pretrained(target, max_batch=2, max_seq_len=128, speculation={"method": "ngram", "k": 2})
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (5, 64, 20, 64, 1)]
    outs = eng.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [w[:n] for w, n in zip(want, (5, 64, 20, 64, 1))]
    assert [o.finish_reason for o in outs] == ["length"] * 5


def test_stream_chunks_add_up_to_the_completion(target, plain):
    _, want = plain
    eng = Engine.from_pretrained(target, max_batch=8, max_seq_len=256, speculation={"method": "ngram", "k": 3})
    got = {i: [] for i in range(len(PROMPTS))}
    finished = set()
    for c in eng.generate_stream(PROMPTS, SamplingParams(max_tokens=64, ignore_eos=True)):
        assert c.index not in finished
        assert 1 <= len(c.token_ids) <= c.accepted_tokens + 1 and c.accepted_tokens <= c.draft_tokens <= 3
        got[c.index].extend(c.token_ids)
        if c.finished:
            finished.add(c.index)
            assert c.finish_reason == "length"
    assert [got[i] for i in range(len(PROMPTS))] == want and finished == set(range(len(PROMPTS)))


def test_stop_token_ids_cut_inside_an_accepted_run(target, plain):
    _, want = plain
    stop = want[0][20]
    first = want[0].index(stop)
    eng = spec_engine("synthetic", 8, target, None, want, alpha=1.0)
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=64, stop_token_ids=(stop,)))[0]
    assert out.token_ids == want[0][:first + 1] and out.finish_reason == "stop"


@pytest.mark.parametrize("kind", ["ngram", "draft_model", "layer_skip"])
def test_greedy_and_sampled_requests_share_a_step(kind, target, draft, plain):
    """Sampled requests get their own logits rows (runner.run(full=...); with
    n-gram drafts they are verified inside the runner instead, runner.run(sample=...)),
    greedy ones only the argmax: with top_k=1 a sampled request is greedy in
    distribution, so a batch alternating the two must reproduce the plain
    output; a row handed to the wrong request would not."""
    ref_eng, want = plain
    # a token budget of 7 prefills the longer prompts in parts: rows that are neither verified nor sampled
    eng = spec_engine(kind, 3, target, draft, max_tokens_per_step=7)
    params = [SamplingParams(max_tokens=64, ignore_eos=True, **({"temperature": 0.7, "top_k": 1, "seed": i}
                                                              if i % 2 else {})) for i in range(len(PROMPTS))]
    outs = eng.generate(PROMPTS, params)
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    assert sum(o.stats.accepted_tokens for o in outs[1::2]) > 0       # the sampled ones drafted and verified


def test_seeded_sampling_is_reproducible_with_and_without_speculation(target, draft):
    for spec in (None, {"method": "draft_model", "k": 3, "draft_model": str(draft)}):
        eng = Engine.from_pretrained(target, max_batch=8, max_seq_len=256, speculation=spec)
        p = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
        a = [o.token_ids for o in eng.generate(PROMPTS, p)]
        b = [o.token_ids for o in eng.generate(PROMPTS, p)]
        c = [o.token_ids for o in eng.generate(PROMPTS, SamplingParams(
            max_tokens=24, temperature=0.9, top_p=0.95, seed=8, ignore_eos=True))]
        assert a == b and a != c


def test_a_bad_prompt_in_a_batch_queues_nothing(target, plain):
    _, want = plain
    eng = Engine.from_pretrained(target, max_batch=4, max_seq_len=128)
    with pytest.raises(ValueError, match=r"prompt 1: stop strings need a tokenizer.json"):
        eng.generate(PROMPTS[:2], [SamplingParams(max_tokens=4), SamplingParams(max_tokens=4, stop=("x",))])
    with pytest.raises(ValueError, match=r"prompt 2: token id 999 outside the vocabulary"):
        eng.generate([PROMPTS[0], PROMPTS[1], [999]], SamplingParams(max_tokens=4))
    assert not eng.scheduler.has_work
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [w[:8] for w in want]


@pytest.mark.parametrize("kind", ["draft_model", "layer_skip"])
def test_abort_frees_the_slot_and_others_finish_unchanged(kind, target, draft, plain):
    ref_eng, want = plain
    eng = spec_engine(kind, 3, target, draft)
    params = SamplingParams(max_tokens=64, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS[:3]]
    queued = eng.add_request(PROMPTS[3], params)       # aborted while still waiting or just admitted
    assert eng.abort(queued)
    outs: dict[int, list[int]] = {}

    def run(steps=None):
        n = 0
        while eng.has_work and (steps is None or n < steps):
            for r, chunk in eng.step():
                outs.setdefault(r.id, []).extend(chunk.token_ids)
            n += 1
    run(3)
    free_before = eng.runner.cache.free_slots
    assert eng.abort(ids[1])
    assert eng.runner.cache.free_slots == free_before + 1
    assert not eng.abort(ids[1]) and not eng.abort(12345)
    run()
    assert queued not in outs and len(outs[ids[1]]) < 64
    for i in (0, 2):
        assert_same_or_near_tie(ref_eng, PROMPTS[i], want[i], outs[ids[i]])
    st = eng.stats()
    assert st["requests_aborted"] == 2 and st["requests_finished"] == 2 and st["running"] == 0
    assert st["kv_slots_used"] == 0 and st["generated_tokens"] == sum(map(len, outs.values()))
    assert 0 <= st["accepted_tokens"] <= st["draft_tokens"]
    assert sum(st["k_histogram"].values()) >= 1
    assert all(0.0 <= a <= 1.0 for a in st["acceptance_per_position"])
    assert eng.last_step.step_s > 0 and set(eng.last_step.phase_s) == {"schedule", "propose", "forward", "verify"}


def test_engine_freezes_startup_objects_out_of_the_collector(target):
    """Building an engine moves what exists then into the collector's permanent
    generation (gc.freeze), so a full collection in a later step does not
    scan torch and the model (~96 ms on the bundled pair)."""
    import gc
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    Engine.from_pretrained(target, max_batch=1, max_seq_len=64)
    assert gc.get_freeze_count() > 10_000
