"""Drafters against independent references.

- n-gram prompt lookup: hand-built sequences with known answers;
- draft model: proposals equal the draft model's own greedy continuation
  (specmoe's Engine on the draft checkpoint, itself checked against
  transformers in test_families), after partial acceptance, all-accepted
  steps and rollback, batched with ragged k, and as a fresh proposer would;
  sampled drafts equal probs_from_logits + sample replayed on teacher-forced logits;
- layer skip: proposals equal transformers' Mixtral truncated to the chosen
  layers, run without a cache (full recompute per token);
- synthetic: exact at alpha 1 and 0, per-position acceptance within 4
  standard errors of alpha * decay**j.

The tiny checkpoints are written by transformers' own classes.
"""

import random

import pytest
import torch

from specmoe import Engine, SamplingParams
from specmoe.drafter import (DraftInput, ModelProposer, NgramProposer, SyntheticProposer, draft_model_proposer,
                             layer_skip_proposer)
from specmoe.drafter.ngram import lookup
from specmoe.experts.checkpoint import read_checkpoint

VOCAB = 128
MAX_LEN = 96
TARGET_LAYERS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _save(cls_name: str, cfg_name: str, path, seed: int, **kw):
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(max_position_embeddings=256, initializer_range=0.2, bos_token_id=0,
                                          eos_token_id=VOCAB - 1, pad_token_id=None, rms_norm_eps=1e-6,
                                          num_attention_heads=4, num_key_value_heads=2, **kw)
    getattr(transformers, cls_name)(cfg).float().eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    return {
        "draft": _save("LlamaForCausalLM", "LlamaConfig", root / "draft", 1, vocab_size=VOCAB, hidden_size=64,
                       num_hidden_layers=2, intermediate_size=128),
        "draft96": _save("LlamaForCausalLM", "LlamaConfig", root / "draft96", 2, vocab_size=96, hidden_size=32,
                         num_hidden_layers=1, intermediate_size=64),
        "target": _save("MixtralForCausalLM", "MixtralConfig", root / "target", 3, vocab_size=VOCAB,
                        hidden_size=64, num_hidden_layers=TARGET_LAYERS, intermediate_size=48,
                        num_local_experts=8, num_experts_per_tok=2),
    }


@pytest.fixture(scope="module")
def target_cfg(ckpts):
    return read_checkpoint(ckpts["target"]).config


@pytest.fixture(scope="module")
def draft_engine(ckpts):
    return Engine.from_pretrained(ckpts["draft"], max_batch=4, max_seq_len=2 * MAX_LEN)   # room past MAX_LEN


@pytest.fixture(scope="module")
def target_engine(ckpts):
    return Engine.from_pretrained(ckpts["target"], max_batch=4, max_seq_len=MAX_LEN)


@pytest.fixture(scope="module")
def hf_target(ckpts):
    from transformers import MixtralForCausalLM
    return MixtralForCausalLM.from_pretrained(ckpts["target"], dtype=torch.float32).eval()


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB - 1) for _ in range(n)]


def ask(proposer, *reqs):
    """reqs: (req_id, tokens, k) -> the proposed token lists."""
    return [p.tokens for p in proposer.propose([DraftInput(r, list(t), k) for r, t, k in reqs])]


# ---------------------------------------------------------------- n-gram

def test_ngram_prefers_longest_match():
    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # trigram [1 2 3] at 0 beats the more recent bigram [2 3] at 6
    assert ask(NgramProposer(1, 3), (0, seq, 4)) == [[9, 9, 5, 2]]
    assert ask(NgramProposer(1, 2), (0, seq, 4)) == [[7, 8, 1, 2]]
    assert ask(NgramProposer(3, 3), (0, [5, 2, 3, 7, 1, 2, 3], 4)) == [[]]   # no trigram, bigrams not allowed


def test_ngram_most_recent_occurrence_with_k_followers():
    seq = [4, 5, 6, 4, 7, 4, 8, 4]
    assert ask(NgramProposer(1, 1), (0, seq, 3)) == [[7, 4, 8]]  # the 4 at index 5 has only 2 followers
    assert ask(NgramProposer(1, 1), (0, seq, 2)) == [[8, 4]]     # ... enough for k = 2
    assert ask(NgramProposer(1, 1), (0, seq, 1)) == [[8]]        # cut by k
    assert ask(NgramProposer(1, 1), (0, seq, 9)) == [[5, 6, 4, 7, 4, 8, 4]]   # none has 9: the most followers
    assert ask(NgramProposer(1, 3), (0, [7, 7, 7, 7], 5)) == [[7]]   # [7 7 7] at 0, one token follows
    assert ask(NgramProposer(1, 3), (0, [7] * 12, 4)) == [[7, 7, 7, 7]]   # a repetition drafts k, not 1


def test_ngram_no_match():
    p = NgramProposer()
    assert ask(p, (0, [1, 2, 3, 4], 3), (1, [5], 3), (2, [3, 1, 3], 2)) == [[], [], [1, 3]]
    assert all(pr.probs is None for pr in p.propose([DraftInput(0, [3, 1, 3], 2)]))


def test_ngram_index_answers_as_the_scan():
    """The proposer's per-request index, grown a few tokens at a time (as
    decode commits them), proposes what the stateless scan `lookup` finds at
    every length, for small vocabularies (many repeats) and every k; a request
    id reused for another sequence, or released, starts a fresh index."""
    rng = random.Random(7)
    for trial in range(120):
        V, min_n = rng.choice([2, 3, 5, 16]), rng.randint(1, 3)
        max_n = rng.randint(min_n, 4)
        p = NgramProposer(min_n, max_n)
        seq = [rng.randrange(V) for _ in range(rng.randint(1, 50))]
        L = rng.randint(1, 4)
        while L <= len(seq):
            k = rng.choice([1, 3, 8])
            assert ask(p, (trial, seq[:L], k)) == [lookup(seq[:L], k, min_n, max_n)], (seq[:L], k, min_n, max_n)
            L += rng.randint(1, 5)
        other = [rng.randrange(V) for _ in range(20)]
        assert ask(p, (trial, other, 3)) == [lookup(other, 3, min_n, max_n)]
        p.release(trial)
        assert trial not in p._index

def test_ngram_kind_is_match_length_and_whether_the_text_followed():
    """kind = n + max_n * f: n the matched n-gram's length, f = 1 when the
    tokens committed since this request's last proposal agree with it (all
    accepted plus a bonus, or a prefix with the next token it proposed too)."""
    p = NgramProposer(1, 3)
    kind = lambda toks, k=4: p.propose([DraftInput(0, list(toks), k)])[0].kind  # noqa: E731
    seq = [1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    assert kind(seq) == 3                            # trigram [1 2 3], no earlier proposal
    assert ask(NgramProposer(1, 3), (0, seq, 4)) == [[9, 9, 5, 2]]
    assert kind(seq + [9, 9, 5, 2, 3]) == 3 + 3      # all four accepted, then a bonus: followed
    assert kind(seq + [9, 9, 5, 2, 3] + [7, 8]) == 3 + 3    # proposed [7 8 1 2]: a prefix of it came
    assert kind(seq + [9, 9, 5, 2, 3, 7, 8, 1, 5]) == 1     # proposed [1 2 3 9], 5 came; 1-gram [5] matches
    q = NgramProposer(1, 2)
    assert q.propose([DraftInput(1, [5, 6, 5], 2)])[0].kind == 1                  # 1-gram [5]
    assert q.propose([DraftInput(1, [5, 6, 5, 7, 5], 2)])[0].kind == 1            # proposed [6 5], 7 came
    assert q.propose([DraftInput(1, [5, 6, 5, 7, 5, 7], 2)])[0].kind == 2 + 2     # proposed [7 5], 7 came
    assert q.propose([DraftInput(2, [1, 2, 3], 2)])[0].kind is None              # no match, no kind


@pytest.mark.parametrize("kw, msg", [(dict(min_n=0), "min_n"), (dict(min_n=3, max_n=2), "max_n"),
                                     (dict(max_n=2.5), "max_n")])
def test_ngram_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        NgramProposer(**kw)


# ---------------------------------------------------------------- draft model

def greedy(engine: Engine, toks: list[int], k: int) -> list[int]:
    """The model's own greedy continuation of `toks`: the oracle for greedy drafts."""
    return engine.generate([toks], SamplingParams(max_tokens=k, ignore_eos=True))[0].token_ids


def check_sync(make, oracle, prompt: list[int]) -> None:
    """Proposals track the committed tokens through partial acceptance with a
    correction, all accepted + a bonus, an unchanged resend, a rollback and a
    token changed before the end (a reused request id):
    each equals the oracle and what a fresh proposer (no history) proposes."""
    prop = make()

    def step(what: str, committed: list[int], k: int) -> list[int]:
        got = ask(prop, (7, committed, k))[0]
        want = oracle(committed, k)
        assert got == want, f"{what}: drafts {got}, oracle {want}"
        fresh = make()
        assert ask(fresh, (7, committed, k))[0] == want, f"{what}: a fresh proposer differs"
        fresh.release(7)
        return got

    d = step("first", prompt, 5)
    committed = prompt + d[:2] + [(d[2] + 1) % VOCAB]
    d = step("2 accepted + correction", committed, 4)
    committed = committed + d + [11]
    step("all accepted + bonus", committed, 3)
    step("resent unchanged", committed, 3)
    step("rollback below the cached prefix", prompt[:6], 2)
    step("an earlier token changed", prompt[:3] + [(prompt[3] + 1) % VOCAB] + prompt[4:], 3)
    prop.release(7)
    assert prop.cache.free_slots == prop.cache.num_slots


def test_draft_model_greedy_and_sync(ckpts, target_cfg, draft_engine):
    make = lambda: draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=2, max_seq_len=MAX_LEN)  # noqa: E731
    check_sync(make, lambda t, k: greedy(draft_engine, t, k), tokens(12, seed=1))


def test_draft_model_ragged_batch(ckpts, target_cfg, draft_engine):
    prop = draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=4, max_seq_len=MAX_LEN)
    reqs = [(1, tokens(5, 2), 1), (2, tokens(17, 3), 3), (3, tokens(9, 4), 6)]
    got = ask(prop, *reqs)
    assert got == [greedy(draft_engine, t, k) for _, t, k in reqs]
    # Next step, each request in a different state: partly accepted, all accepted + bonus, resent unchanged.
    nxt = [(1, reqs[0][1] + [5], 4), (2, reqs[1][1] + got[1] + [9], 2), (3, reqs[2][1], 5)]
    got = ask(prop, *nxt)
    assert got == [greedy(draft_engine, t, k) for _, t, k in nxt]
    for r, _, _ in nxt:
        prop.release(r)
    assert prop.cache.free_slots == 4
    # Requests past the cache's room: drafts cut to max_seq_len - len + 1, none beyond.
    assert ask(prop, (4, tokens(MAX_LEN - 2, 5), 6), (5, tokens(MAX_LEN + 1, 6), 2)) == \
        [greedy(draft_engine, tokens(MAX_LEN - 2, 5), 3), []]


def test_draft_model_sampling_replays(ckpts, target_cfg, draft_engine):
    sampling = pytest.importorskip("specmoe.kernels.sampling")
    if not hasattr(sampling, "probs_from_logits"):
        pytest.skip("kernels.sampling.probs_from_logits not available yet")
    prop = draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=2, max_seq_len=MAX_LEN)
    prompt, k, temp, top_k, top_p = tokens(10, 7), 5, 0.9, 20, 0.9
    [p] = prop.propose([DraftInput(0, prompt, k, temp, top_k, top_p, torch.Generator().manual_seed(3))])
    assert p.probs is not None and p.probs.shape == (k, VOCAB) and p.probs.dtype == torch.float32
    # Replay: teacher-forced draft logits at the positions that drew each draft, the same sampler, the same seed.
    logits = draft_engine.logits(prompt + p.tokens[:-1])[len(prompt) - 1:]          # (k, V)
    ref = sampling.probs_from_logits(logits, temp, top_k, top_p)
    torch.testing.assert_close(p.probs, ref, atol=1e-5, rtol=0)
    gen = torch.Generator().manual_seed(3)
    assert p.tokens == [int(sampling.sample(ref[j:j + 1], gen)[0]) for j in range(k)]
    # A greedy request in the same batch still drafts greedily, probs None.
    out = prop.propose([DraftInput(0, prompt, 3, temp, top_k, top_p, torch.Generator().manual_seed(3)),
                        DraftInput(1, prompt, 3)])
    assert out[0].tokens == p.tokens[:3] and out[1].probs is None
    assert out[1].tokens == greedy(draft_engine, prompt, 3)
    # Greedy and sampled inputs interleaved (the runner returns only the sampled
    # rows' logits): each proposal equals what its input drafts alone.
    mixed = draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=4, max_seq_len=MAX_LEN)
    prompts = [tokens(9 + i, 30 + i) for i in range(4)]
    def inp(i, rid):
        return DraftInput(rid, prompts[i], 4, *((temp, top_k, top_p, torch.Generator().manual_seed(40 + i))
                                                if i % 2 else ()))
    together = mixed.propose([inp(i, i) for i in range(4)])
    for i, got in enumerate(together):
        [alone] = draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=1, max_seq_len=MAX_LEN).propose([inp(i, 0)])
        assert got.tokens == alone.tokens and (got.probs is None) == (alone.probs is None) == (i % 2 == 0)
        if got.probs is not None:
            torch.testing.assert_close(got.probs, alone.probs, atol=1e-5, rtol=0)


def test_draft_model_confidence_stop(ckpts, target_cfg):
    """min_confidence: the drafts are transformers' greedy continuation of the
    draft checkpoint up to and including the first whose softmax probability
    is below the threshold; several requests in one batch stop at their own
    positions, a stopped request's cache stays in step (the next call with its
    drafts committed equals a fresh proposer's), and the threshold is checked."""
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(ckpts["draft"], dtype=torch.float32).eval()

    def reference(toks, k, c):
        ids, out = list(toks), []
        with torch.no_grad():
            for _ in range(k):
                p = torch.softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
                out.append(int(p.argmax()))
                ids.append(out[-1])
                if p.max() < c:
                    break
        return out

    prompts = [tokens(8 + 3 * i, 60 + i) for i in range(6)]
    K = 8
    # The threshold: the median top probability over the prompts' first 8 greedy drafts, so some stop early.
    with torch.no_grad():
        tops = []
        for t in prompts:
            ids = list(t)
            for _ in range(K):
                p = torch.softmax(hf(torch.tensor([ids])).logits[0, -1], -1)
                tops.append(float(p.max()))
                ids.append(int(p.argmax()))
    c = sorted(tops)[len(tops) // 2]
    prop = draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=6, max_seq_len=MAX_LEN, min_confidence=c)
    got = ask(prop, *[(i, t, K) for i, t in enumerate(prompts)])
    want = [reference(t, K, c) for t in prompts]
    assert got == want
    assert len({len(d) for d in got}) > 1 and min(len(d) for d in got) < K    # stops differ, some early
    nxt = [(i, t + d + [5], 3) for i, (t, d) in enumerate(zip(prompts, got))]
    assert ask(prop, *nxt) == [reference(t, k, c) for _, t, k in nxt]
    assert ask(draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=1, max_seq_len=MAX_LEN,
                                    min_confidence=c), (0, *nxt[2][1:])) == [reference(nxt[2][1], 3, c)]
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_confidence"):
            draft_model_proposer(target_cfg, ckpts["draft"], max_seqs=1, max_seq_len=MAX_LEN, min_confidence=bad)
    with pytest.raises(ValueError, match="min_confidence applies to draft_model and layer_skip"):
        Engine.from_pretrained(ckpts["target"], max_batch=1, max_seq_len=MAX_LEN,
                               speculation={"method": "ngram", "min_confidence": 0.5})


def test_draft_model_vocab_mismatch(ckpts, target_cfg):
    with pytest.raises(ValueError, match=r"vocab_size 96.*has 128"):
        draft_model_proposer(target_cfg, ckpts["draft96"], max_seqs=1, max_seq_len=32)


# ---------------------------------------------------------------- layer skip

def truncated_greedy(hf, layer_ids: list[int], toks: list[int], k: int) -> list[int]:
    """transformers' Mixtral with only `layer_ids` (then its norm and LM head),
    greedy by full recompute without a cache."""
    full, n = hf.model.layers, hf.config.num_hidden_layers
    hf.model.layers = torch.nn.ModuleList(full[i] for i in layer_ids)
    hf.config.num_hidden_layers = len(layer_ids)
    try:
        ids = list(toks)
        with torch.no_grad():
            for _ in range(k):
                ids.append(int(hf(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    finally:
        hf.model.layers, hf.config.num_hidden_layers = full, n
    return ids[len(toks):]


@pytest.mark.parametrize("layers, ids", [(2, [0, 1]), ([0, 2], [0, 2])])
def test_layer_skip_matches_truncated_transformers(target_engine, hf_target, layers, ids):
    make = lambda: layer_skip_proposer(target_engine.runner, layers, max_seqs=2, max_seq_len=MAX_LEN)  # noqa: E731
    prop = make()
    assert prop.runner is target_engine.runner and len(prop.cache.layers) == len(ids)
    prompt = tokens(11, seed=8)
    before = greedy(target_engine, prompt, 8)
    # The harness is right with every layer, and skipping layers changes the drafts.
    assert truncated_greedy(hf_target, list(range(TARGET_LAYERS)), prompt, 8) == before
    assert truncated_greedy(hf_target, ids, prompt, 8) != before
    check_sync(make, lambda t, k: truncated_greedy(hf_target, ids, t, k), prompt)
    assert greedy(target_engine, prompt, 8) == before          # the target's own cache is untouched


@pytest.mark.parametrize("layers, msg", [(0, "1..3"), (TARGET_LAYERS, "1..3"), ([], "empty"),
                                         ([2, 1], "sorted"), ([1, 1], "unique"), ([0, 4], "outside"),
                                         ([-1, 2], "outside"), ([0, 1, 2, 3], "all 4")])
def test_layer_skip_validation(target_engine, layers, msg):
    with pytest.raises(ValueError, match=msg):
        layer_skip_proposer(target_engine.runner, layers, max_seqs=1, max_seq_len=32)


def test_model_proposer_rejects_bad_sizes(target_engine):
    with pytest.raises(ValueError, match="rotary table"):
        ModelProposer(target_engine.runner, [0], max_seqs=1, max_seq_len=10**6)


# ---------------------------------------------------------------- synthetic

PROMPT, CONT = (5, 6, 7), [10, 20, 30, 40, 50, 60, 70]


def test_synthetic_exact_at_alpha_one_and_zero():
    one = SyntheticProposer({PROMPT: CONT}, alpha=1.0, vocab_size=VOCAB)
    assert one.synthetic and one.name == "synthetic"
    assert ask(one, (0, list(PROMPT), 3), (1, list(PROMPT) + CONT[:5], 4), (2, list(PROMPT) + CONT, 2)) == \
        [CONT[:3], CONT[5:], []]
    zero = SyntheticProposer({PROMPT: CONT}, alpha=0.0, vocab_size=VOCAB)
    for i in range(len(CONT)):
        d = ask(zero, (0, list(PROMPT) + CONT[:i], 7))[0]
        assert len(d) == len(CONT) - i and all(a != b and 0 <= a < VOCAB for a, b in zip(d, CONT[i:]))


def test_synthetic_acceptance_rate_per_position():
    alpha, decay, k, n = 0.8, 0.85, 4, 4000
    prop = SyntheticProposer({PROMPT: CONT}, alpha, decay, vocab_size=VOCAB, seed=1)
    request_gen = torch.Generator().manual_seed(0)
    state = request_gen.get_state()
    hits = torch.zeros(k)
    for rid in range(n):                 # a request per sample: each run of the prompt draws its own coins
        [p] = prop.propose([DraftInput(rid, list(PROMPT) + CONT[:1], k, 1.0, generator=request_gen)])
        hits += torch.tensor([float(a == b) for a, b in zip(p.tokens, CONT[1:])])
        prop.release(rid)
    assert torch.equal(request_gen.get_state(), state), "the request's generator was used"
    for j in range(k):
        want = alpha * decay ** j
        se = (want * (1 - want) / n) ** 0.5
        assert abs(hits[j] / n - want) < 4 * se, f"position {j}: rate {hits[j] / n:.3f}, expected {want:.3f}"


def test_synthetic_coins_are_common_to_engines_and_fresh_per_run():
    """Two proposers (two benchmark engines) with the same seed draw the same
    coins for the same prompt, run and position, whatever their request ids
    and whatever else they drafted; a second run of a prompt draws new ones."""
    cont = list(range(10, 50))
    a = SyntheticProposer({PROMPT: cont}, 0.5, vocab_size=VOCAB, seed=4)
    b = SyntheticProposer({PROMPT: cont}, 0.5, vocab_size=VOCAB, seed=4)
    first = [ask(a, (7, list(PROMPT) + cont[:i], 8))[0] for i in (0, 5, 9)]
    ask(b, (100, list(PROMPT) + cont[:3], 2))            # b's first run drafts elsewhere first
    assert [ask(b, (100, list(PROMPT) + cont[:i], 8))[0] for i in (0, 5, 9)] == first
    b.release(100)
    second = [ask(b, (101, list(PROMPT) + cont[:i], 8))[0] for i in (0, 5, 9)]
    assert second != first


def test_synthetic_coin_is_per_position_whatever_the_depth_or_start():
    """Flat acceptance: whether c[t] is proposed right depends on t alone, not
    on where the draft starts or how deep it is, so a shallow and a deep
    policy face the same hard tokens; asked again at t, the same answer. With
    decay, the threshold falls with depth on the same coin: a position right
    at depth j is right at every shallower depth."""
    cont = list(range(10, 70))
    flat = SyntheticProposer({PROMPT: cont}, 0.5, vocab_size=VOCAB, seed=5)
    right = {}
    for i in range(0, 52, 4):
        for k in (1, 3, 8):
            [d] = ask(flat, (1, list(PROMPT) + cont[:i], k))
            for j, tok in enumerate(d):
                right.setdefault(i + j, set()).add(tok == cont[i + j])
    assert all(len(v) == 1 for v in right.values()), "a position's verdict changed with the draft's start or depth"
    verdicts = [v.pop() for _, v in sorted(right.items())]
    assert 0 < sum(verdicts) < len(verdicts)
    decayed = SyntheticProposer({PROMPT: cont}, 0.9, 0.7, vocab_size=VOCAB, seed=5)
    for t in range(8, 40):
        depth_right = [ask(decayed, (2, list(PROMPT) + cont[:t - j], j + 1))[0][j] == cont[t] for j in range(8)]
        assert depth_right == sorted(depth_right, reverse=True), (t, depth_right)     # right, then wrong


def test_synthetic_per_prompt_alpha():
    """prompt_alpha gives a prompt its own acceptance; the others keep alpha."""
    other = (9, 8, 7, 6)
    prop = SyntheticProposer({PROMPT: CONT, other: CONT}, alpha=0.5, vocab_size=VOCAB, seed=2,
                             prompt_alpha={PROMPT: 1.0, other: 0.0})
    for rid in range(20):
        good, bad = ask(prop, (2 * rid, list(PROMPT) + CONT[:1], 5), (2 * rid + 1, list(other) + CONT[:1], 5))
        assert good == CONT[1:6] and all(a != b for a, b in zip(bad, CONT[1:6]))
        prop.release(2 * rid), prop.release(2 * rid + 1)
    prop.set_alpha(0.0)                                   # a trace's next phase: no per-prompt rates now
    [d] = ask(prop, (99, list(PROMPT) + CONT[:1], 5))
    assert all(a != b for a, b in zip(d, CONT[1:6]))
    half = SyntheticProposer({PROMPT: CONT, other: CONT}, alpha=0.5, vocab_size=VOCAB, seed=2,
                             prompt_alpha={PROMPT: 1.0})
    hits = 0
    for rid in range(400):
        [d] = ask(half, (rid, list(other) + CONT[:1], 1))
        hits += d == CONT[1:2]
        half.release(rid)
    assert abs(hits / 400 - 0.5) < 4 * (0.25 / 400) ** 0.5
    with pytest.raises(ValueError, match="alpha must be in"):
        SyntheticProposer({PROMPT: CONT}, alpha=0.5, vocab_size=VOCAB, prompt_alpha={PROMPT: 2.0})
    with pytest.raises(ValueError, match="without a continuation"):
        SyntheticProposer({PROMPT: CONT}, alpha=0.5, vocab_size=VOCAB, prompt_alpha={other: 0.5})


def test_synthetic_errors():
    prop = SyntheticProposer({PROMPT: CONT}, alpha=0.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="none of the 1 known prompts"):
        prop.propose([DraftInput(0, [1, 2, 3, 4], 2)])
    with pytest.raises(ValueError, match="output token 1 is 99"):
        prop.propose([DraftInput(0, list(PROMPT) + [10, 99], 2)])
    with pytest.raises(ValueError, match="alpha"):
        SyntheticProposer({PROMPT: CONT}, alpha=1.5, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="outside"):
        SyntheticProposer({PROMPT: [VOCAB]}, alpha=0.5, vocab_size=VOCAB)
