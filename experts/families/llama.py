"""Dense Llama (LlamaForCausalLM), a draft-model family: GQA attention with
optional biases, gated MLP, rope default / linear / llama3."""

from ..config import ConfigError, ModelConfig
from ._common import attention_specs, check_act, eos_ids, get, mlp_specs, need, norm_specs, outer_specs, parse_rope

ARCHITECTURES = ("LlamaForCausalLM",)
MODEL_TYPES = ("llama",)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    if hf.get("mlp_bias"):
        raise ConfigError(f"{arch}: mlp_bias=true is not supported")
    D, H = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=need(hf, "num_hidden_layers", arch), num_heads=H,
        num_kv_heads=get(hf, "num_key_value_heads", H, arch), head_dim=get(hf, "head_dim", D // H, arch),
        intermediate_size=need(hf, "intermediate_size", arch), rms_norm_eps=get(hf, "rms_norm_eps", 1e-6, arch, float),
        rope=parse_rope(hf, arch), max_position=get(hf, "max_position_embeddings", 2048, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias,
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def dense_weight_specs(c: ModelConfig, qk_norm_dim: int = 0) -> dict:
    """Specs of a dense Llama-layout model; also used by the Qwen2 and Qwen3 files."""
    D = c.hidden_size
    specs = dict(outer_specs(c.vocab_size, D, c.tie_word_embeddings))
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        specs.update({f"layers.{i}.{k}": v for k, v in norm_specs(p, D).items()})
        specs.update({f"layers.{i}.attn.{k}": v for k, v in attention_specs(
            p, c.num_heads, c.num_kv_heads, c.head_dim, D, c.qkv_bias, c.o_bias).items()})
        if qk_norm_dim:
            specs[f"layers.{i}.attn.q_norm"] = [(p + "self_attn.q_norm.weight", (qk_norm_dim,))]
            specs[f"layers.{i}.attn.k_norm"] = [(p + "self_attn.k_norm.weight", (qk_norm_dim,))]
        specs.update({f"layers.{i}.mlp.{k}": v for k, v in mlp_specs(p + "mlp.", c.intermediate_size, D).items()})
    return specs


def weight_specs(c: ModelConfig) -> dict:
    return dense_weight_specs(c)
