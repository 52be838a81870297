"""OLMoE (OlmoeForCausalLM): RMSNorm over the whole q and k projections (not per
head), optional clip_qkv, softmax top-k without renormalisation by default."""

from ..config import ModelConfig, MoEConfig
from ._common import (need_any, attention_specs, check_act, eos_ids, expert_specs, get, need, norm_specs,
                      outer_specs, parse_rope)

ARCHITECTURES = ("OlmoeForCausalLM",)
MODEL_TYPES = ("olmoe",)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    D, H, L = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch), need(hf, "num_hidden_layers", arch)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="olmoe", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=L, num_heads=H, num_kv_heads=get(hf, "num_key_value_heads", H, arch),
        head_dim=get(hf, "head_dim", D // H, arch), intermediate_size=need(hf, "intermediate_size", arch),
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-5, arch, float), rope=parse_rope(hf, arch),
        max_position=get(hf, "max_position_embeddings", 4096, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias,
        qk_norm="full", clip_qkv=get(hf, "clip_qkv", 0.0, arch, float),
        moe=MoEConfig(num_experts=need_any(hf, ("num_experts", "num_local_experts"), arch), top_k=need(hf, "num_experts_per_tok", arch),
                      expert_ffn=need(hf, "intermediate_size", arch),
                      renormalize=bool(hf.get("norm_topk_prob", False)), layers=tuple(range(L))),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def weight_specs(c: ModelConfig) -> dict:
    D, E, F = c.hidden_size, c.moe.num_experts, c.moe.expert_ffn
    H, G, d = c.num_heads, c.num_kv_heads, c.head_dim
    specs = dict(outer_specs(c.vocab_size, D, c.tie_word_embeddings))
    for i in range(c.num_layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        specs.update({f"layers.{i}.{k}": v for k, v in norm_specs(p, D).items()})
        specs.update({f"layers.{i}.attn.{k}": v for k, v in attention_specs(
            p, H, G, d, D, c.qkv_bias, c.o_bias).items()})
        specs[f"layers.{i}.attn.q_norm"] = [(p + "self_attn.q_norm.weight", (H * d,))]
        specs[f"layers.{i}.attn.k_norm"] = [(p + "self_attn.k_norm.weight", (G * d,))]
        specs[f"layers.{i}.moe.router"] = [(m + "gate.weight", (E, D))]
        specs.update({f"layers.{i}.moe.{k}": v for k, v in expert_specs(m, E, F, D).items()})
    return specs
