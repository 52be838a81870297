"""The CUDA path: the same checkpoint on cuda gives the CPU logits and greedy
text. Marked `gpu`; skipped where CUDA is absent."""

import pytest
import torch

from specmoe import Engine, SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]


@pytest.fixture(scope="module", params=["mixtral", "deepseek_v3"])
def ckpt(request, tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(request.param)
    if request.param == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM
        MixtralForCausalLM(MixtralConfig(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, initializer_range=0.2)).save_pretrained(d)
    else:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
        DeepseekV3ForCausalLM(DeepseekV3Config(
            vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, n_group=4, topk_group=2, initializer_range=0.2)).save_pretrained(d)
    return d


def test_cuda_logits_and_greedy_match_cpu(ckpt):
    ids = list(range(5, 45))
    cpu, gpu = Engine.from_pretrained(ckpt), Engine.from_pretrained(ckpt, device="cuda")
    torch.testing.assert_close(gpu.logits(ids).cpu(), cpu.logits(ids), atol=1e-4, rtol=1e-4)
    p = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [ids[:7], ids[3:20]]
    assert [o.token_ids for o in gpu.generate(prompts, p)] == [o.token_ids for o in cpu.generate(prompts, p)]


def test_cuda_bfloat16_loads_and_tracks_float32(ckpt):
    ids = list(range(5, 45))
    ref = Engine.from_pretrained(ckpt).logits(ids)
    got = Engine.from_pretrained(ckpt, device="cuda", dtype="bfloat16").logits(ids).cpu()
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_cuda_speculation_greedy_lossless_and_seeded_sampling(ckpt):
    prompts = [list(range(5, 17)), [9, 9, 9, 9, 9, 9]]
    off = Engine.from_pretrained(ckpt, device="cuda")
    spec = Engine.from_pretrained(ckpt, device="cuda", speculation={"method": "layer_skip", "k": 3, "layers": 1})
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, greedy)] == [o.token_ids for o in off.generate(prompts, greedy)]
    sampled = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.8, seed=3)
    a, b = spec.generate(prompts, sampled), spec.generate(prompts, sampled)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
