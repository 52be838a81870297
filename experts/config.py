"""The normalised architecture description every family file produces.

One frozen msgspec Struct tree; a family's `parse_config` translates a Hugging
Face config.json into it, so the shared layers never look at raw HF keys.
"""

import msgspec


class ConfigError(ValueError):
    """A checkpoint's config.json is malformed or describes something unsupported."""


class RopeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    theta: float = 10000.0          # base wavelength
    kind: str = "default"           # default | linear | yarn | llama3
    factor: float = 1.0             # context extension factor (linear, yarn, llama3)
    original_max_position: int = 0  # pre-extension context (yarn, llama3)
    beta_fast: float = 32.0         # yarn: extrapolation boundary
    beta_slow: float = 1.0          # yarn: interpolation boundary
    mscale: float = 0.0             # yarn: cos/sin scale numerator term (0: from factor)
    mscale_all_dim: float = 0.0     # yarn: also scales the softmax (DeepSeek)
    attention_factor: float = 0.0   # yarn: explicit cos/sin scale (0: derived)
    truncate: bool = True           # yarn: round the correction range
    low_freq_factor: float = 1.0    # llama3
    high_freq_factor: float = 4.0   # llama3
    interleaved: bool = False       # rotate adjacent pairs (DeepSeek) instead of halves


class MLAConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    q_lora_rank: int = 0            # 0: full-rank q_proj
    kv_lora_rank: int = 512         # C, the compressed latent cached per token
    qk_nope_head_dim: int = 128     # per-head query/key dims without rotary
    qk_rope_head_dim: int = 64      # shared rotary key dims, cached beside the latent
    v_head_dim: int = 128


class MoEConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    num_experts: int = 8            # E routed experts per MoE layer
    top_k: int = 2                  # K experts per token
    expert_ffn: int = 512           # F of one routed expert
    scoring: str = "softmax"        # softmax | sigmoid (DeepSeek-V3, with correction bias)
    renormalize: bool = True        # renormalise the kept top-k weights
    n_group: int = 1                # sigmoid: expert groups for group-limited top-k
    topk_group: int = 1             # sigmoid: groups a token may use
    routed_scale: float = 1.0       # multiplies routed weights (routed_scaling_factor)
    shared_ffn: int = 0             # width of the always-on shared expert(s), 0: none
    shared_gate: bool = False       # Qwen2-MoE: sigmoid gate on the shared expert
    layers: tuple[int, ...] = ()    # indices of MoE layers; the others are dense


class ModelConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    family: str                     # family module name, e.g. "mixtral"
    architecture: str               # HF architectures[0], e.g. "MixtralForCausalLM"
    vocab_size: int
    hidden_size: int                # D
    num_layers: int
    num_heads: int                  # H
    num_kv_heads: int               # G (GQA); MLA ignores it
    head_dim: int                   # d for GQA attention
    intermediate_size: int          # F of dense MLP layers
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position: int = 4096        # max_position_embeddings
    tie_word_embeddings: bool = False
    qkv_bias: bool = False          # biases on q/k/v projections
    o_bias: bool = False            # bias on the output projection
    qk_norm: str = "none"           # none | head (Qwen3: per head) | full (OLMoE: whole projection)
    clip_qkv: float = 0.0           # OLMoE: clamp q/k/v to +-clip_qkv, 0: off
    sliding_window: int = 0         # 0: full attention
    mla: MLAConfig | None = None    # DeepSeek multi-head latent attention
    moe: MoEConfig | None = None    # None: dense model
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{self.architecture}: {name} must be positive, got {getattr(self, name)}")
        if self.mla is None and self.num_heads % max(self.num_kv_heads, 1):
            raise ConfigError(f"{self.architecture}: num_attention_heads {self.num_heads} is not a multiple "
                              f"of num_key_value_heads {self.num_kv_heads}")
        if self.moe is not None:
            m = self.moe
            if not 0 < m.top_k <= m.num_experts:
                raise ConfigError(f"{self.architecture}: experts per token {m.top_k} must be in 1..{m.num_experts}")
            if m.scoring not in ("softmax", "sigmoid"):
                raise ConfigError(f"{self.architecture}: unknown router scoring {m.scoring!r}")
            if m.num_experts % m.n_group or not 0 < m.topk_group <= m.n_group:
                raise ConfigError(f"{self.architecture}: {m.num_experts} experts cannot form {m.n_group} groups "
                                  f"with topk_group {m.topk_group}")
            if any(not 0 <= i < self.num_layers for i in m.layers):
                raise ConfigError(f"{self.architecture}: MoE layer index out of range 0..{self.num_layers - 1}")
        if self.qk_norm not in ("none", "head", "full"):
            raise ConfigError(f"{self.architecture}: unknown qk_norm {self.qk_norm!r}")
        if self.rope.kind not in ("default", "linear", "yarn", "llama3"):
            raise ConfigError(f"{self.architecture}: rope scaling type {self.rope.kind!r} is not supported "
                              "(supported: default, linear, yarn, llama3)")

    @property
    def rotary_dim(self) -> int:
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and i in self.moe.layers
