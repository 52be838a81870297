"""Dense Qwen3 (Qwen3ForCausalLM), a draft-model family: per-head q/k RMSNorm."""

from ..config import ConfigError, ModelConfig
from ._common import check_act, eos_ids, get, need, parse_rope
from .llama import dense_weight_specs

ARCHITECTURES = ("Qwen3ForCausalLM",)
MODEL_TYPES = ("qwen3",)


def parse_config(hf: dict) -> ModelConfig:
    arch = ARCHITECTURES[0]
    check_act(hf, arch)
    if hf.get("use_sliding_window"):
        raise ConfigError(f"{arch}: use_sliding_window=true (per-layer sliding windows) is not supported")
    D, H = need(hf, "hidden_size", arch), need(hf, "num_attention_heads", arch)
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="qwen3", architecture=arch, vocab_size=need(hf, "vocab_size", arch), hidden_size=D,
        num_layers=need(hf, "num_hidden_layers", arch), num_heads=H,
        num_kv_heads=get(hf, "num_key_value_heads", H, arch), head_dim=get(hf, "head_dim", D // H, arch),
        intermediate_size=need(hf, "intermediate_size", arch), rms_norm_eps=get(hf, "rms_norm_eps", 1e-6, arch, float),
        rope=parse_rope(hf, arch), max_position=get(hf, "max_position_embeddings", 32768, arch),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=bias, o_bias=bias,
        qk_norm="head", bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids(hf))


def weight_specs(c: ModelConfig) -> dict:
    return dense_weight_specs(c, qk_norm_dim=c.head_dim)
