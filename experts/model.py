"""The decoder-only causal LM every family loads into.

Legend: T flat tokens of a ragged batch (see batch.py), D hidden, V vocab.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import rotary
from ..kernels.linear import linear
from ..kernels.norms import rms_norm
from .batch import BatchMeta
from .cache import KVCache
from .config import ModelConfig
from .dispatch import Dispatcher, LocalDispatcher
from .layers import MLP, Attention, MLAttention, MoE, _param
from .stats import RoutingStats


def rope_tables(c: ModelConfig, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, R/2) float32 cos and sin for the config's rotary scaling."""
    r, dim = c.rope, c.rotary_dim
    scale = 1.0
    if r.kind == "default":
        inv = rotary.inv_freq_default(r.theta, dim)
    elif r.kind == "linear":
        inv = rotary.inv_freq_default(r.theta, dim) / r.factor
    elif r.kind == "llama3":
        inv = rotary.inv_freq_llama3(r.theta, dim, r.factor, r.low_freq_factor, r.high_freq_factor,
                                     r.original_max_position)
    else:  # yarn
        inv, scale = rotary.inv_freq_yarn(r.theta, dim, r.factor, r.original_max_position, r.beta_fast,
                                          r.beta_slow, r.mscale or None, r.mscale_all_dim or None,
                                          r.attention_factor or None, r.truncate)
    return rotary.cos_sin_table(inv, positions, scale)


def mla_softmax_scale(c: ModelConfig) -> float:
    """qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek)."""
    scale = (c.mla.qk_nope_head_dim + c.mla.qk_rope_head_dim) ** -0.5
    if c.rope.kind != "default" and c.rope.mscale_all_dim and c.rope.factor > 1:
        m = 0.1 * c.rope.mscale_all_dim * math.log(c.rope.factor) + 1.0
        scale *= m * m
    return scale


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig, i: int, dispatcher: Dispatcher, stats: RoutingStats, dtype, device,
                 experts: list[int] | None = None):
        super().__init__()
        self.eps = c.rms_norm_eps
        self.input_norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.post_norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.attn = (MLAttention(c, dtype, device, mla_softmax_scale(c)) if c.mla is not None
                     else Attention(c, dtype, device))
        if c.is_moe_layer(i):
            self.moe = MoE(c, i, dispatcher, stats, dtype, device, experts)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, dtype, device)
        # A bound method, not a second registration of the module: parameter and
        # state_dict names stay unique (layers.i.moe.* / layers.i.mlp.*).
        self.ffn = self.moe.forward if c.is_moe_layer(i) else self.mlp.forward

    def forward(self, x, meta, cos, sin, cache):
        # .forward, not __call__: no hooks are registered on these modules, and at
        # batch 1 the per-call hook bookkeeping is a measurable share of a layer.
        x = x + self.attn.forward(rms_norm(x, self.input_norm, self.eps), meta, cos, sin, cache)
        return x + self.ffn(rms_norm(x, self.post_norm, self.eps))


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; `forward` runs one
    ragged batch over the KV cache and returns hidden states (T, D)."""

    def __init__(self, c: ModelConfig, dtype=torch.float32, device="cpu", max_positions: int = 4096,
                 dispatcher: Dispatcher | None = None, experts: list[int] | None = None):
        """`experts` (with an expert-parallel dispatcher): the global ids of the
        routed experts this process holds; routing statistics then count the
        tokens each of these received, in that order. None: all experts."""
        super().__init__()
        self.config, self.dtype, self.device = c, dtype, torch.device(device)
        E = c.moe.num_experts if c.moe else 0
        self.experts = list(range(E)) if experts is None else list(experts)
        self.routing_stats = RoutingStats(c.num_layers, len(self.experts), device)
        dispatcher = dispatcher or LocalDispatcher(E)
        self.embed = _param(c.vocab_size, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(DecoderLayer(c, i, dispatcher, self.routing_stats, dtype, device, experts)
                                    for i in range(c.num_layers))
        self.norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed if c.tie_word_embeddings else _param(c.vocab_size, c.hidden_size,
                                                                       dtype=dtype, device=device)
        cos, sin = rope_tables(c, max_positions)
        if not c.rope.interleaved:   # the layers rotate half-split pairs with full-width tables
            cos, sin = rotary.full_width_tables(cos, sin)
        # In the model dtype once here (an elementwise cast: the same values a per-forward cast gives).
        self.register_buffer("rope_cos", cos.to(device, dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(device, dtype), persistent=False)

    @property
    def max_positions(self) -> int:
        return self.rope_cos.shape[0]

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Parameter name -> tensor, the names family weight specs use."""
        return dict(self.named_parameters())

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: BatchMeta, cache: KVCache,
                layer_ids: Sequence[int] | None = None) -> torch.Tensor:
        """input_ids (T,) -> hidden (T, D) after the final norm. With layer_ids,
        only those layers run (self-speculative drafting) and cache.layers[j]
        holds the KV of layer layer_ids[j]."""
        layers = self.layers if layer_ids is None else [self.layers[i] for i in layer_ids]
        if len(cache.layers) != len(layers):
            raise ValueError(f"cache has {len(cache.layers)} layers for {len(layers)} model layers")
        x = F.embedding(input_ids, self.embed)
        # (T, 1, R/2), or (T, 1, R) full-width (half-split layout), in the model dtype,
        # broadcast over heads by every layer.
        if meta.pos_range is not None:   # one contiguous run: a view, no gather
            cos, sin = (t[meta.pos_range[0]:meta.pos_range[1], None] for t in (self.rope_cos, self.rope_sin))
        else:
            cos, sin = self.rope_cos[meta.positions, None], self.rope_sin[meta.positions, None]
        for layer, layer_cache in zip(layers, cache.layers):
            x = layer.forward(x, meta, cos, sin, layer_cache)   # see DecoderLayer.forward
        return rms_norm(x, self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, D) -> logits (T, V) in float32."""
        return linear(hidden, self.lm_head).float()
