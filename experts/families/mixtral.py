"""Mixtral (MixtralForCausalLM): Llama attention with GQA, every layer MoE,
softmax top-k routing renormalised over the kept experts, experts w1/w3/w2."""

from ..config import ModelConfig, MoEConfig
from ._common import (need_any, attention_specs, check_act, eos_ids, expert_specs, get, need, norm_specs,
                      outer_specs, parse_rope)

ARCHITECTURES = ("MixtralForCausalLM",)
MODEL_TYPES = ("mixtral",)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    D, H, L = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch), need(hf, "num_hidden_layers", arch)
    return ModelConfig(
        family="mixtral", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=L, num_heads=H, num_kv_heads=get(hf, "num_key_value_heads", H, arch),
        head_dim=get(hf, "head_dim", D // H, arch), intermediate_size=need(hf, "intermediate_size", arch),
        rms_norm_eps=get(hf, "rms_norm_eps", 1e-5, arch, float), rope=parse_rope(hf, arch),
        max_position=get(hf, "max_position_embeddings", 4096, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=get(hf, "sliding_window", 0, arch),
        moe=MoEConfig(num_experts=need_any(hf, ("num_local_experts", "num_experts"), arch), top_k=need(hf, "num_experts_per_tok", arch),
                      expert_ffn=need(hf, "intermediate_size", arch), renormalize=True, layers=tuple(range(L))),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def weight_specs(c: ModelConfig) -> dict:
    D, E, F = c.hidden_size, c.moe.num_experts, c.moe.expert_ffn
    specs = dict(outer_specs(c.vocab_size, D, c.tie_word_embeddings))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        m = p + "block_sparse_moe."
        specs.update({f"layers.{i}.{k}": v for k, v in norm_specs(p, D).items()})
        specs.update({f"layers.{i}.attn.{k}": v for k, v in attention_specs(
            p, c.num_heads, c.num_kv_heads, c.head_dim, D, False, False).items()})
        specs[f"layers.{i}.moe.router"] = [(m + "gate.weight", (E, D))]
        specs.update({f"layers.{i}.moe.{k}": v for k, v in expert_specs(m, E, F, D, ("w1", "w3", "w2")).items()})
    return specs
