"""Qwen2-MoE (Qwen2MoeForCausalLM): q/k/v biases, softmax top-k (renormalised
only with norm_topk_prob), a shared expert scaled by a sigmoid gate, and dense
layers where mlp_only_layers / decoder_sparse_step say so."""

from ..config import ModelConfig, MoEConfig
from ._common import (need_any, attention_specs, check_act, eos_ids, expert_specs, get, mlp_specs, need, norm_specs,
                      outer_specs, parse_rope)

ARCHITECTURES = ("Qwen2MoeForCausalLM",)
MODEL_TYPES = ("qwen2_moe",)


def moe_layers(hf: dict, L: int, arch: str) -> tuple[int, ...]:
    step = get(hf, "decoder_sparse_step", 1, arch)
    only_dense = set(hf.get("mlp_only_layers") or [])
    if need_any(hf, ("num_experts", "num_local_experts"), arch) <= 0:
        return ()
    return tuple(i for i in range(L) if i not in only_dense and (i + 1) % step == 0)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    D, H, L = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch), need(hf, "num_hidden_layers", arch)
    if hf.get("use_sliding_window"):
        raise_sliding(arch)
    return ModelConfig(
        family="qwen2_moe", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=L, num_heads=H, num_kv_heads=get(hf, "num_key_value_heads", H, arch),
        head_dim=get(hf, "head_dim", D // H, arch), intermediate_size=need(hf, "intermediate_size", arch),
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-6, arch, float), rope=parse_rope(hf, arch),
        max_position=get(hf, "max_position_embeddings", 32768, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bool(hf.get("qkv_bias", True)),
        moe=MoEConfig(num_experts=need_any(hf, ("num_experts", "num_local_experts"), arch), top_k=need(hf, "num_experts_per_tok", arch),
                      expert_ffn=need(hf, "moe_intermediate_size", arch),
                      renormalize=bool(hf.get("norm_topk_prob", False)),
                      shared_ffn=get(hf, "shared_expert_intermediate_size", 0, arch), shared_gate=True,
                      layers=moe_layers(hf, L, arch)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def raise_sliding(arch: str):
    from ..config import ConfigError
    raise ConfigError(f"{arch}: use_sliding_window=true (per-layer sliding windows) is not supported")


def weight_specs(c: ModelConfig) -> dict:
    D, E, F = c.hidden_size, c.moe.num_experts, c.moe.expert_ffn
    specs = dict(outer_specs(c.vocab_size, D, c.tie_word_embeddings))
    for i in range(c.num_layers):
        p, m = f"model.layers.{i}.", f"model.layers.{i}.mlp."
        specs.update({f"layers.{i}.{k}": v for k, v in norm_specs(p, D).items()})
        specs.update({f"layers.{i}.attn.{k}": v for k, v in attention_specs(
            p, c.num_heads, c.num_kv_heads, c.head_dim, D, c.qkv_bias, False).items()})
        if not c.is_moe_layer(i):
            specs.update({f"layers.{i}.mlp.{k}": v for k, v in mlp_specs(m, c.intermediate_size, D).items()})
            continue
        specs[f"layers.{i}.moe.router"] = [(m + "gate.weight", (E, D))]
        specs.update({f"layers.{i}.moe.{k}": v for k, v in expert_specs(m, E, F, D).items()})
        if c.moe.shared_ffn:
            specs.update({f"layers.{i}.moe.shared_{k}": v
                          for k, v in mlp_specs(m + "shared_expert.", c.moe.shared_ffn, D).items()})
            specs[f"layers.{i}.moe.shared_gate"] = [(m + "shared_expert_gate.weight", (1, D))]
    return specs
