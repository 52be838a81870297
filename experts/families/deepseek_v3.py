"""DeepSeek-V3 (DeepseekV3ForCausalLM): multi-head latent attention with q/kv
low-rank projections and a compressed latent KV cache, interleaved rotary with
YaRN, sigmoid routing with correction bias and group-limited top-k, routed
scaling, shared experts, and dense layers before first_k_dense_replace."""

from ..config import ConfigError, MLAConfig, ModelConfig, MoEConfig
from ._common import need_any, check_act, eos_ids, expert_specs, get, mlp_specs, need, norm_specs, outer_specs, parse_rope

ARCHITECTURES = ("DeepseekV3ForCausalLM",)
MODEL_TYPES = ("deepseek_v3",)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    if hf.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ConfigError(f"{arch}: topk_method {hf['topk_method']!r} is not supported (expected 'noaux_tc')")
    D, H, L = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch), need(hf, "num_hidden_layers", arch)
    mla = MLAConfig(q_lora_rank=get(hf, "q_lora_rank", 0, arch), kv_lora_rank=need(hf, "kv_lora_rank", arch),
                    qk_nope_head_dim=need(hf, "qk_nope_head_dim", arch),
                    qk_rope_head_dim=need(hf, "qk_rope_head_dim", arch), v_head_dim=need(hf, "v_head_dim", arch))
    first_dense = get(hf, "first_k_dense_replace", 0, arch)
    n_shared = get(hf, "n_shared_experts", 0, arch)
    F = need(hf, "moe_intermediate_size", arch)
    bias = bool(hf.get("attention_bias", False))
    if bias:
        raise ConfigError(f"{arch}: attention_bias=true is not supported")
    return ModelConfig(
        family="deepseek_v3", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=L, num_heads=H, num_kv_heads=H, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        intermediate_size=need(hf, "intermediate_size", arch), rms_norm_eps=get(hf, "rms_norm_eps", 1e-6, arch, float),
        rope=parse_rope(hf, arch, interleaved=bool(hf.get("rope_interleave", True))),
        max_position=get(hf, "max_position_embeddings", 4096, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), mla=mla,
        moe=MoEConfig(num_experts=need_any(hf, ("n_routed_experts", "num_local_experts"), arch), top_k=need(hf, "num_experts_per_tok", arch),
                      expert_ffn=F, scoring="sigmoid", renormalize=bool(hf.get("norm_topk_prob", True)),
                      n_group=get(hf, "n_group", 1, arch), topk_group=get(hf, "topk_group", 1, arch),
                      routed_scale=get(hf, "routed_scaling_factor", 1.0, arch, float), shared_ffn=F * n_shared,
                      layers=tuple(range(first_dense, L))),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def weight_specs(c: ModelConfig) -> dict:
    D, E, F, H, a = c.hidden_size, c.moe.num_experts, c.moe.expert_ffn, c.num_heads, c.mla
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    specs = dict(outer_specs(c.vocab_size, D, c.tie_word_embeddings))
    for i in range(c.num_layers):
        p, m, s = f"model.layers.{i}.", f"model.layers.{i}.mlp.", f"model.layers.{i}.self_attn."
        specs.update({f"layers.{i}.{k}": v for k, v in norm_specs(p, D).items()})
        at = f"layers.{i}.attn."
        if a.q_lora_rank:
            specs[at + "q_a"] = [(s + "q_a_proj.weight", (a.q_lora_rank, D))]
            specs[at + "q_a_norm"] = [(s + "q_a_layernorm.weight", (a.q_lora_rank,))]
            specs[at + "q_b"] = [(s + "q_b_proj.weight", (H * qk, a.q_lora_rank))]
        else:
            specs[at + "q"] = [(s + "q_proj.weight", (H * qk, D))]
        specs[at + "kv_a"] = [(s + "kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope_head_dim, D))]
        specs[at + "kv_a_norm"] = [(s + "kv_a_layernorm.weight", (a.kv_lora_rank,))]
        specs[at + "kv_b"] = [(s + "kv_b_proj.weight", (H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank))]
        specs[at + "o"] = [(s + "o_proj.weight", (D, H * a.v_head_dim))]
        if not c.is_moe_layer(i):
            specs.update({f"layers.{i}.mlp.{k}": v for k, v in mlp_specs(m, c.intermediate_size, D).items()})
            continue
        specs[f"layers.{i}.moe.router"] = [(m + "gate.weight", (E, D))]
        specs[f"layers.{i}.moe.router_bias"] = [(m + "gate.e_score_correction_bias", (E,))]
        specs.update({f"layers.{i}.moe.{k}": v for k, v in expert_specs(m, E, F, D).items()})
        if c.moe.shared_ffn:
            specs.update({f"layers.{i}.moe.shared_{k}": v
                          for k, v in mlp_specs(m + "shared_experts.", c.moe.shared_ffn, D).items()})
    return specs
