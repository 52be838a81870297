"""Every supported family, end to end against transformers.

For each family variant (see conftest.FAMILIES) a tiny random checkpoint is
written by transformers' own class and loaded through specmoe; then:

1. full-sequence logits match transformers (float32, atol 1e-4);
2. prefill + single-token decode steps match the full-sequence logits;
3. a (k+1)-token verification forward equals k+1 single-token steps;
4. a ragged batch equals each sequence alone; rollback then re-decode equals
   never having decoded the rejected tokens;
5. greedy generation equals transformers' `generate`, EOS included;
plus routing against transformers' routers, bfloat16 loading, and checks
that the comparisons are sensitive to what they are meant to catch.
"""

import json
import random

import pytest
import torch
from safetensors import safe_open

from specmoe import SamplingParams
from specmoe.experts import batch
from specmoe.experts.batch import Chunk

# The ids the conftest checkpoints use (pytest runs with --import-mode=importlib,
# so conftest cannot be imported; test_config_matches_transformers checks these).
VOCAB, BOS, EOS = 128, 0, 127
ATOL = 1e-4
SEQ_LEN = 96    # > original_max_position_embeddings (64) of the YaRN and llama3 variants


pytestmark = pytest.mark.usefixtures("one_thread")


def random_tokens(n: int, seed: int) -> list[int]:
    """Token ids that avoid BOS and EOS."""
    rng = random.Random(seed)
    return [rng.randrange(BOS + 1, EOS) for _ in range(n)]


SEQ = random_tokens(SEQ_LEN, seed=1234)


def assert_nontrivial(ref: torch.Tensor) -> None:
    """The reference logits must vary enough for atol 1e-4 to mean something."""
    std = ref.float().std().item()
    assert std > 0.5, f"reference logits std {std:.3f} <= 0.5: the comparison would be trivial"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float = ATOL) -> None:
    assert actual.dtype == torch.float32, f"{what}: logits dtype {actual.dtype}, expected float32"
    assert tuple(actual.shape) == tuple(expected.shape), f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3e} > {atol:g}"


def run_chunks(runner, plan, all_logits=True):
    """plan: [(slot, tokens_of_the_sequence, start, n)] -> per chunk its logits
    rows ((n, V) with all_logits, else (1, V) of the last token)."""
    chunks = [Chunk(slot, start, list(seq[start:start + n])) for slot, seq, start, n in plan]
    assert all(len(c.tokens) == n for c, (_, _, _, n) in zip(chunks, plan))
    logits = runner.run(chunks, all_logits=all_logits).logits
    sizes = [n if all_logits else 1 for *_, n in plan]
    assert logits.shape[0] == sum(sizes)
    return list(logits.split(sizes))


def check_plan(runner, built, plan, what, all_logits=True):
    """Run one ragged step and compare every chunk with transformers' logits of
    its sequence alone."""
    rows = run_chunks(runner, plan, all_logits)
    for j, ((slot, seq, start, n), got) in enumerate(zip(plan, rows)):
        ref = built.ref_logits(list(seq))
        want = ref[start:start + n] if all_logits else ref[start + n - 1:start + n]
        assert_close(got, want, f"{what}: chunk {j} (slot {slot}, start {start}, {n} tokens)")
    return rows


# --------------------------------------------------------------------------- loading


def test_config_matches_transformers(family, load_engine):
    eng = load_engine(family)
    c, hf = eng.config, family.hf.config
    assert c.family == family.spec.family
    assert c.architecture == family.spec.model_cls
    assert (c.vocab_size, c.hidden_size, c.num_layers) == (hf.vocab_size, hf.hidden_size, hf.num_hidden_layers)
    assert c.tie_word_embeddings == bool(hf.tie_word_embeddings)
    assert (hf.vocab_size, hf.bos_token_id, hf.eos_token_id) == (VOCAB, BOS, EOS)
    assert EOS in eng.eos_token_ids
    rope_kind = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
    assert c.rope.kind == rope_kind
    if family.spec.family == "deepseek_v3":
        assert c.mla is not None
        assert c.mla.q_lora_rank == (hf.q_lora_rank or 0)
        assert c.moe.scoring == "sigmoid"
        assert (c.moe.n_group, c.moe.topk_group, c.moe.routed_scale) == (hf.n_group, hf.topk_group, 2.5)
    else:
        assert c.mla is None
    if family.spec.moe:
        assert c.moe is not None
        assert list(c.moe.layers) == family.moe_layers, "MoE / dense layer split differs from transformers"
        assert c.moe.top_k == hf.num_experts_per_tok
        assert c.moe.renormalize == bool(getattr(hf, "norm_topk_prob", True))   # Mixtral always renormalises
        if family.spec.family == "deepseek_v3":
            shared = hf.moe_intermediate_size * hf.n_shared_experts
        else:
            shared = getattr(hf, "shared_expert_intermediate_size", 0)
        assert c.moe.shared_ffn == shared
        assert c.moe.shared_gate == (family.spec.family == "qwen2_moe")
    else:
        assert c.moe is None
        assert family.moe_layers == []
    assert c.rope.interleaved == (family.spec.family == "deepseek_v3" and bool(hf.rope_interleave))
    assert c.clip_qkv == (getattr(hf, "clip_qkv", None) or 0.0)
    assert c.sliding_window == (16 if family.spec.id == "mixtral-sliding_window" else 0)


def test_tied_embeddings_share_storage(checkpoints, load_engine):
    built = checkpoints("qwen3-tied")
    with safe_open(built.path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = load_engine(built).runner.model
    assert model.lm_head.data_ptr() == model.embed.data_ptr()


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3-yarn", "deepseek_v3-full_rank_q"])
def test_deepseek_correction_bias_saved_and_loaded(checkpoints, load_engine, name):
    built = checkpoints(name)
    model = load_engine(built).runner.model
    with safe_open(built.path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        bias_keys = sorted(k for k in keys if k.endswith("mlp.gate.e_score_correction_bias"))
        assert [int(k.split(".")[2]) for k in bias_keys] == built.moe_layers == [1, 2]
        for k in bias_keys:
            saved = f.get_tensor(k)
            assert saved.abs().max() > 0.01, f"{k} was saved as zeros"
            assert torch.equal(model.layers[int(k.split(".")[2])].moe.router_bias.cpu(), saved.float())
        if built.spec.kwargs["q_lora_rank"] is None:
            assert not any("q_a_proj" in k for k in keys) and any("self_attn.q_proj" in k for k in keys)
        else:
            assert any("q_a_proj" in k for k in keys)


# --------------------------------------------------------------------------- 1. logits


def test_full_sequence_logits_match_transformers(family, load_engine):
    eng = load_engine(family)
    ref = family.ref_logits(SEQ)
    assert_nontrivial(ref)
    got = eng.logits(SEQ)
    assert_close(got, ref, "full-sequence logits")
    assert eng.runner.cache.free_slots == eng.runner.cache.num_slots


def test_routing_matches_transformers(moe_family, load_engine):
    """Tokens per expert in every layer equal those of transformers' routers,
    and the routing actually varies across tokens."""
    eng = load_engine(moe_family)
    runner, m = eng.runner, eng.config.moe
    slot = runner.cache.allocate()
    snap = runner.run([Chunk(slot, 0, SEQ)], all_logits=True, routing=True).routing
    assert snap is not None
    counts = snap.tokens_per_expert
    assert tuple(counts.shape) == (eng.config.num_layers, m.num_experts)
    ref = moe_family.ref_routing(SEQ)
    assert sorted(ref) == list(m.layers)
    for i in range(eng.config.num_layers):
        if i in ref:
            assert counts[i].tolist() == ref[i].tolist(), f"layer {i}: tokens per expert differ from transformers"
            assert counts[i].sum().item() == SEQ_LEN * m.top_k
            assert snap.distinct_experts[i] > m.top_k, \
                f"layer {i}: only {snap.distinct_experts[i]} distinct experts over {SEQ_LEN} tokens"
        else:
            assert counts[i].sum().item() == 0 and snap.distinct_experts[i] == 0, f"dense layer {i} recorded routing"
    # One decode token uses exactly top_k experts per MoE layer.
    snap = runner.run([Chunk(slot, SEQ_LEN, [SEQ[0]])], routing=True).routing
    for i in m.layers:
        assert snap.distinct_experts[i] == m.top_k and snap.tokens_per_expert[i].sum().item() == m.top_k
    assert runner.run([Chunk(slot, 0, SEQ[:4])]).routing is None


# --------------------------------------------------------------------------- 2. prefill + decode


@pytest.mark.parametrize("prefill", [1, 17])
def test_prefill_then_decode_matches_full_sequence(family, load_engine, prefill):
    eng = load_engine(family)
    runner = eng.runner
    ref = family.ref_logits(SEQ)
    assert_nontrivial(ref)
    slot = runner.cache.allocate()
    got = runner.run([Chunk(slot, 0, SEQ[:prefill])], all_logits=True).logits
    assert_close(got, ref[:prefill], "prefill logits")
    rows = []
    for pos in range(prefill, SEQ_LEN):
        rows.append(runner.run([Chunk(slot, pos, [SEQ[pos]])]).logits)
    assert_close(torch.cat(rows), ref[prefill:], f"decode steps after a {prefill}-token prefill")


# --------------------------------------------------------------------------- 3. verification


@pytest.mark.parametrize("k", [1, 3, 8])
def test_verification_equals_single_steps(family, load_engine, k):
    """Repeated (k+1)-token verification chunks in one slot equal the same tokens
    fed one at a time in another slot, and both equal transformers."""
    eng = load_engine(family)
    runner = eng.runner
    ref = family.ref_logits(SEQ)
    verify, single = runner.cache.allocate(), runner.cache.allocate()
    n0 = 11
    runner.run([Chunk(verify, 0, SEQ[:n0])])
    runner.run([Chunk(single, 0, SEQ[:n0])])
    pos, rounds = n0, 0
    while pos + k + 1 <= SEQ_LEN and rounds < 6:
        chunk = SEQ[pos:pos + k + 1]
        v = runner.run([Chunk(verify, pos, chunk)], all_logits=True).logits
        s = torch.cat([runner.run([Chunk(single, pos + j, [t])]).logits for j, t in enumerate(chunk)])
        assert_close(v, s, f"k={k}: verification vs single steps at {pos}", atol=2e-5)
        assert_close(v, ref[pos:pos + k + 1], f"k={k}: verification vs transformers at {pos}")
        last = runner.run([Chunk(verify, pos, chunk)]).logits      # same chunk again, last row only
        assert_close(last, ref[pos + k:pos + k + 1], f"k={k}: re-run verification, last-token logits")
        pos, rounds = pos + k + 1, rounds + 1
    assert rounds >= 3


# --------------------------------------------------------------------------- 4. ragged batch, rollback


@pytest.mark.parametrize("ragged", ["split", "pad"])
def test_ragged_batch_equals_each_sequence_alone(family, load_engine, ragged, monkeypatch):
    # split: attention per chunk length (the default); pad: every chunk padded to the longest
    monkeypatch.setattr(batch, "RAGGED_ATTENTION", ragged)
    eng = load_engine(family)
    runner = eng.runner
    A, B, C, D = (random_tokens(n, seed) for n, seed in ((60, 1), (40, 2), (70, 3), (30, 4)))
    for s in (A, B, C, D):
        assert_nontrivial(family.ref_logits(s))
    slots = [runner.cache.allocate() for _ in range(5)]
    sa, sb, sc, sd = slots[3], slots[4], slots[1], slots[0]
    # prefills of different lengths, slots out of order
    check_plan(runner, family, [(sc, C, 0, 33), (sa, A, 0, 18), (sb, B, 0, 5)], "step 1 (prefills)")
    # a verification, a decode, a long verification and a new prefill together
    check_plan(runner, family, [(sa, A, 18, 4), (sb, B, 5, 1), (sc, C, 33, 9), (sd, D, 0, 12)], "step 2 (mixed)")
    # the same shapes, last-token logits only
    check_plan(runner, family, [(sa, A, 22, 1), (sb, B, 6, 1), (sc, C, 42, 1), (sd, D, 12, 1)],
               "step 3 (decodes, different lengths)", all_logits=False)
    # equal chunk lengths at different starts
    check_plan(runner, family, [(sd, D, 13, 3), (sc, C, 43, 3), (sa, A, 23, 3), (sb, B, 7, 3)],
               "step 4 (uniform chunks, different starts)")
    check_plan(runner, family, [(sb, B, 10, 16), (sd, D, 16, 2)], "step 5 (catch-up)", all_logits=False)
    # two chunk lengths, two sequences each at different starts (attention parts of several sequences)
    check_plan(runner, family, [(sd, D, 18, 2), (sc, C, 46, 5), (sa, A, 26, 2), (sb, B, 26, 5)],
               "step 5b (two lengths, two sequences each)")
    # two sequences of equal length decoding in contiguous slots (no mask needed)
    assert (sa, sb) == (slots[3], slots[3] + 1)
    for pos in range(26, 30):
        check_plan(runner, family, [(sa, A, pos, 1), (sb, B, pos, 1)], f"step 6 (equal lengths, pos {pos})")
    # everything to the end of each sequence in one forward
    check_plan(runner, family, [(sa, A, 30, 30), (sb, B, 30, 10), (sc, C, 46, 24), (sd, D, 18, 12)],
               "step 7 (to the end)")
    # a long prefill beside a far-along decode (re-decoding C's last token): padded query rows
    E = random_tokens(45, 5)
    check_plan(runner, family, [(slots[2], E, 0, 40), (sc, C, 69, 1)], "step 8 (prefill beside a long decode)")


def test_rollback_then_redecode_equals_never_decoding_rejected(family, load_engine):
    """Emulated speculative decoding: drafts with wrong tokens are verified,
    rejected rows are rolled back by restarting at a smaller position; every
    accepted row equals transformers on the sequence without the rejected
    tokens, and the slot ends up equal to one that never saw them. Another
    longer sequence runs alongside so stale rows lie inside the batch's
    context and must be masked."""
    eng = load_engine(family)
    runner = eng.runner
    S, O = random_tokens(64, 21), random_tokens(90, 22)
    ref = family.ref_logits(S)
    wrong = [(t + 7) % (EOS - 1) + 1 for t in S]     # differs from S at every position
    assert all(w != t for w, t in zip(wrong, S))
    s, o, clean = runner.cache.allocate(), runner.cache.allocate(), runner.cache.allocate()

    def step(s_start, s_tokens, o_start, o_n, check_rows):
        out = runner.run([Chunk(o, o_start, O[o_start:o_start + o_n]), Chunk(s, s_start, s_tokens)],
                         all_logits=True).logits
        assert_close(out[:o_n], family.ref_logits(O)[o_start:o_start + o_n], f"other sequence at {o_start}")
        got = out[o_n:o_n + check_rows]
        assert_close(got, ref[s_start:s_start + check_rows], f"accepted rows at {s_start}")
        return out[o_n:]

    runner.run([Chunk(s, 0, S[:20]), Chunk(o, 0, O[:50])])
    # draft of 4 all rejected: only the verified token S[20] is kept
    step(20, [S[20]] + wrong[21:25], 50, 1, check_rows=1)
    # draft of 4, two accepted: keep S[21..23]
    step(21, S[21:24] + wrong[24:26], 51, 3, check_rows=3)
    # single-token decode with stale rows at 24, 25 behind it (masked: the other sequence is longer)
    step(24, [S[24]], 54, 1, check_rows=1)
    # six rejected single-token decodes, then roll back and re-decode 15 tokens in one chunk
    for p in range(25, 31):
        runner.run([Chunk(s, p, [wrong[p]])])
    step(25, S[25:40], 55, 1, check_rows=15)
    # an 8-token rejected verification, then roll back to 40 with a single decode
    runner.run([Chunk(s, 40, wrong[40:48])], all_logits=True)
    step(40, [S[40]], 56, 1, check_rows=1)
    step(41, [S[41]], 57, 2, check_rows=1)
    # the rolled-back slot now equals a slot that never saw a rejected token
    runner.run([Chunk(clean, 0, S[:42])])
    rolled = runner.run([Chunk(s, 42, S[42:64])], all_logits=True).logits
    fresh = runner.run([Chunk(clean, 42, S[42:64])], all_logits=True).logits
    assert_close(rolled, fresh, "rolled-back slot vs clean slot", atol=2e-5)
    assert_close(rolled, ref[42:64], "rolled-back slot vs transformers")


def test_rollback_greedy_continuation(family, load_engine):
    """Greedy decoding after a rollback continues exactly like transformers'
    generate from the accepted prefix."""
    eng = load_engine(family)
    runner = eng.runner
    prompt = random_tokens(9, 31)
    want = family.ref_generate(prompt, 12)
    slot = runner.cache.allocate()
    runner.run([Chunk(slot, 0, prompt)])
    # a bad draft of 5 tokens after the prompt, verified and rejected entirely
    bad = [(t + 3) % (EOS - 1) + 1 for t in range(5)]
    runner.run([Chunk(slot, len(prompt), bad)], all_logits=True)
    # roll back: re-feed the last prompt token at its own position and decode greedily
    seq = list(prompt)
    nxt = int(runner.run([Chunk(slot, len(prompt) - 1, [prompt[-1]])]).logits.argmax(-1))
    got = []
    while True:
        got.append(nxt)
        seq.append(nxt)
        if nxt == EOS or len(got) == len(want):
            break
        nxt = int(runner.run([Chunk(slot, len(seq) - 1, [nxt])]).logits.argmax(-1))
    assert got == want


# --------------------------------------------------------------------------- 5. generation

def divergence(built, prompt, got, want) -> str:
    """A failure message naming the first differing step and transformers'
    top-2 logit gap there (a tiny gap would point at a near-tie)."""
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    msg = f"prompt of {len(prompt)} tokens: specmoe {got} != transformers {want}; first difference at step {i}"
    if i < len(want):
        top2 = built.ref_logits(prompt + want[:i])[-1].topk(2).values
        msg += f", transformers' top-2 logit gap there {float(top2[0] - top2[1]):.2e}"
    return msg


PROMPTS = [random_tokens(n, 100 + n) for n in (7, 1, 23, 12)]


def test_greedy_generation_matches_transformers(family, load_engine):
    eng = load_engine(family, max_batch=3)     # 4 prompts: a batch of 3, then one alone
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=False))
    assert len(outs) == len(PROMPTS)
    for prompt, c in zip(PROMPTS, outs):
        want = family.ref_generate(prompt, 32)
        assert c.prompt_token_ids == prompt
        assert c.token_ids == want, divergence(family, prompt, c.token_ids, want)
        if want[-1] == EOS:
            assert c.finish_reason == "stop"
        else:
            assert len(want) == 32 and c.finish_reason == "length"
        assert c.stats.steps == len(c.token_ids)
        assert c.stats.draft_tokens == 0 and c.stats.accepted_tokens == 0
        assert c.stats.prompt_tokens == len(prompt)
    assert eng.runner.cache.free_slots == eng.runner.cache.num_slots


def test_ignore_eos_runs_to_max_tokens(family, load_engine):
    eng = load_engine(family)
    prompt = PROMPTS[2]
    c = eng.generate([prompt], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    want = family.ref_generate(prompt, 32, eos_token_id=None)
    assert c.token_ids == want and len(want) == 32 and c.finish_reason == "length"


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen3"])
@pytest.mark.parametrize("where", ["generation_config", "config_only", "list", "stop_token_ids"])
def test_generation_stops_at_eos_like_transformers(checkpoints, checkpoint_copy, load_engine, name, where):
    """Make a token that greedy decoding reaches an end-of-sequence id, in each
    place it can be declared, and check both implementations stop there; the
    other prompts of the batch go on (or stop) as transformers says."""
    built = checkpoints(name)
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[3]]
    free = built.ref_generate(prompts[0], 32, eos_token_id=None)
    stop_at = next(i for i in range(3, 32) if free[i] not in free[:i])
    new_eos = free[stop_at]
    params = SamplingParams(max_tokens=32)
    path = built.path
    if where == "generation_config":      # config.json keeps the old EOS; generation_config.json wins
        path = checkpoint_copy(built.path, generation_config={"eos_token_id": new_eos})
        declared = [new_eos]
    elif where == "config_only":          # no generation_config.json: config.json is read
        path = checkpoint_copy(built.path, config={"eos_token_id": new_eos})
        (path / "generation_config.json").unlink()
        declared = [new_eos]
    elif where == "list":                 # a list of EOS ids
        declared = [VOCAB - 2, new_eos]
        path = checkpoint_copy(built.path, config={"eos_token_id": declared},
                               generation_config={"eos_token_id": declared})
    else:                                 # the checkpoint's EOS plus a per-request stop id
        declared = [EOS, new_eos]
        params = SamplingParams(max_tokens=32, stop_token_ids=(new_eos,))
    eng = load_engine(built, path=path)
    outs = eng.generate(prompts, params)
    for prompt, c in zip(prompts, outs):
        want = built.ref_generate(prompt, 32, eos_token_id=declared)
        assert c.token_ids == want, divergence(built, prompt, c.token_ids, want)
        assert c.finish_reason == ("stop" if want[-1] in declared else "length")
    assert len(outs[0].token_ids) <= stop_at + 1 and outs[0].finish_reason == "stop"
    c = eng.generate([prompts[0]], SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert c.token_ids == free and c.finish_reason == "length"


# --------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3-yarn", "llama"])
def test_bfloat16_close_to_float32(checkpoints, load_engine, name):
    import transformers
    built = checkpoints(name)
    eng = load_engine(built, dtype="bfloat16")
    assert eng.runner.model.embed.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for layer in eng.runner.cache.layers for t in layer)
    ref = built.ref_logits(SEQ)
    got = eng.logits(SEQ)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err = (got - ref).abs().mean().item()
    assert err < 0.1 * ref.std().item(), f"bf16 mean abs diff {err:.3f} vs logits std {ref.std():.3f}"
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85, f"bf16 argmax agrees with float32 on only {agree:.0%} of positions"
    # no worse than transformers' own bfloat16 run, up to a factor
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(built.path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        hf_err = (hf_bf16(torch.tensor([SEQ])).logits[0].float() - ref).abs().mean().item()
    assert err <= 2 * hf_err + 1e-3, f"specmoe bf16 error {err:.4f} vs transformers bf16 error {hf_err:.4f}"
    c = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert len(c.token_ids) == 8 and all(0 <= t < VOCAB for t in c.token_ids)


# --------------------------------------------------------------------------- the checks can fail


def _rope_default_copy(built, checkpoint_copy):
    cfg = json.loads((built.path / "config.json").read_text())
    theta = cfg["rope_parameters"]["rope_theta"]
    return checkpoint_copy(built.path, config={"rope_parameters": {"rope_type": "default", "rope_theta": theta}})


@pytest.mark.parametrize("name", ["deepseek_v3-yarn", "llama-rope_llama3"])
def test_rope_scaling_is_visible_to_the_logits_check(checkpoints, checkpoint_copy, load_engine, name):
    """Loading the same weights with the rope scaling dropped must fail the
    1e-4 comparison, so the scaled variants really test the scaling."""
    built = checkpoints(name)
    eng = load_engine(built, path=_rope_default_copy(built, checkpoint_copy))
    assert eng.config.rope.kind == "default"
    diff = (eng.logits(SEQ) - built.ref_logits(SEQ)).abs().max().item()
    assert diff > 100 * ATOL


def test_correction_bias_changes_routing(checkpoints, load_engine):
    """Zeroing DeepSeek's correction bias in specmoe must change the routing,
    so test_routing_matches_transformers checks that the bias is applied."""
    built = checkpoints("deepseek_v3")
    eng = load_engine(built)
    for i in built.moe_layers:
        eng.runner.model.layers[i].moe.router_bias.zero_()
    slot = eng.runner.cache.allocate()
    snap = eng.runner.run([Chunk(slot, 0, SEQ)], routing=True).routing
    ref = built.ref_routing(SEQ)
    assert any(snap.tokens_per_expert[i].tolist() != ref[i].tolist() for i in ref)


def test_sliding_window_is_visible_to_the_logits_check(checkpoints):
    """The sliding-window Mixtral has the same weights as the plain one (same
    seed); its transformers logits differ once the window (16) is exceeded, so
    the family tests on it do test the window."""
    plain, windowed = checkpoints("mixtral"), checkpoints("mixtral-sliding_window")
    a, b = plain.ref_logits(SEQ), windowed.ref_logits(SEQ)
    assert torch.equal(a[:16], b[:16])
    assert (a[16:] - b[16:]).abs().max().item() > 100 * ATOL


def test_clip_qkv_is_visible_to_the_logits_check(checkpoints, load_engine):
    built = checkpoints("olmoe-clip_qkv")
    eng = load_engine(built)
    for layer in eng.runner.model.layers:
        layer.attn.clip = 0.0
    diff = (eng.logits(SEQ) - built.ref_logits(SEQ)).abs().max().item()
    assert diff > 100 * ATOL


def test_config_struct_is_frozen(family, load_engine):
    cfg = load_engine(family).config
    with pytest.raises((AttributeError, TypeError)):
        cfg.vocab_size = 1
