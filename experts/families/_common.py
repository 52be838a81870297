"""Pieces shared by the family files: reading HF config keys with clear errors,
rotary settings, and the tensor-name specs of the layers most families share.

A weight spec maps one specmoe parameter to the checkpoint tensors it is built
from: a list of (name, expected shape) parts concatenated along dim 0, or, for
stacked experts, a list of such lists (one per expert) stacked on a new dim 0.
"""

from typing import Any

from ..config import ConfigError, RopeConfig

Part = tuple[str, tuple[int, ...]]
Spec = list[Part] | list[list[Part]]


def need(hf: dict, key: str, arch: str, kind: type = int) -> Any:
    """hf[key] converted to kind, or a ConfigError naming the key."""
    if key not in hf or hf[key] is None:
        raise ConfigError(f"{arch}: config.json has no {key!r}")
    try:
        value = hf[key]
        if kind is int and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{arch}: config.json {key!r} = {hf[key]!r} is not a valid {kind.__name__}") from None


def get(hf: dict, key: str, default: Any, arch: str, kind: type = int) -> Any:
    return default if hf.get(key) is None else need(hf, key, arch, kind)


def parse_rope(hf: dict, arch: str, interleaved: bool = False) -> RopeConfig:
    """Read rotary settings from transformers v5 `rope_parameters` or the older
    `rope_theta` + `rope_scaling` pair that checkpoints on the Hub carry."""
    params = dict(hf.get("rope_parameters") or {})
    if not params:
        params = dict(hf.get("rope_scaling") or {})
        if "rope_theta" in hf:
            params.setdefault("rope_theta", hf["rope_theta"])
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError(f"{arch}: per-layer-type rope_parameters are not supported")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    orig = params.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings") or 0
    try:
        return RopeConfig(
            theta=theta, kind=kind, factor=float(params.get("factor") or 1.0), original_max_position=int(orig),
            beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
            attention_factor=float(params.get("attention_factor") or 0.0),
            truncate=bool(params.get("truncate", True)),
            low_freq_factor=float(params.get("low_freq_factor") or 1.0),
            high_freq_factor=float(params.get("high_freq_factor") or 4.0),
            interleaved=interleaved)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{arch}: malformed rope settings {params!r}: {e}") from None


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)


def check_act(hf: dict, arch: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{arch}: hidden_act {act!r} is not supported (expected 'silu')")


def attention_specs(p: str, H: int, G: int, d: int, D: int, qkv_bias: bool, o_bias: bool) -> dict[str, Spec]:
    """Llama-style self_attn.{q,k,v,o}_proj under prefix p (e.g. 'model.layers.3.')."""
    a = p + "self_attn."
    specs: dict[str, Spec] = {
        "qkv": [(a + "q_proj.weight", (H * d, D)), (a + "k_proj.weight", (G * d, D)),
                (a + "v_proj.weight", (G * d, D))],
        "o": [(a + "o_proj.weight", (D, H * d))],
    }
    if qkv_bias:
        specs["qkv_bias"] = [(a + "q_proj.bias", (H * d,)), (a + "k_proj.bias", (G * d,)),
                             (a + "v_proj.bias", (G * d,))]
    if o_bias:
        specs["o_bias"] = [(a + "o_proj.bias", (D,))]
    return specs


def mlp_specs(m: str, F: int, D: int, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, Spec]:
    """A gated MLP under prefix m (e.g. 'model.layers.3.mlp.'): fused gate|up and down."""
    g, u, dn = names
    return {"gate_up": [(f"{m}{g}.weight", (F, D)), (f"{m}{u}.weight", (F, D))],
            "down": [(f"{m}{dn}.weight", (D, F))]}


def expert_specs(m: str, E: int, F: int, D: int, names=("gate_proj", "up_proj", "down_proj")) -> dict[str, Spec]:
    """Per-expert tensors m + 'experts.{e}.{name}.weight' stacked into (E, 2F, D) and (E, D, F)."""
    g, u, dn = names
    return {"experts_gate_up": [[(f"{m}experts.{e}.{g}.weight", (F, D)), (f"{m}experts.{e}.{u}.weight", (F, D))]
                                for e in range(E)],
            "experts_down": [[(f"{m}experts.{e}.{dn}.weight", (D, F))] for e in range(E)]}


def norm_specs(p: str, D: int) -> dict[str, Spec]:
    return {"input_norm": [(p + "input_layernorm.weight", (D,))],
            "post_norm": [(p + "post_attention_layernorm.weight", (D,))]}


def outer_specs(V: int, D: int, tied: bool) -> dict[str, Spec]:
    specs: dict[str, Spec] = {"embed": [("model.embed_tokens.weight", (V, D))],
                              "norm": [("model.norm.weight", (D,))]}
    if not tied:
        specs["lm_head"] = [("lm_head.weight", (V, D))]
    return specs


def need_any(hf: dict, keys: tuple[str, ...], arch: str, kind: type = int) -> Any:
    """The first of `keys` present (transformers renames some keys between versions)."""
    for k in keys:
        if hf.get(k) is not None:
            return need(hf, k, arch, kind)
    raise ConfigError(f"{arch}: config.json has none of {list(keys)}")
