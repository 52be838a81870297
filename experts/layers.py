"""The shared decoder layers: GQA attention, MLA attention, dense MLP and the
MoE block. Parameters are plain tensors named as in the family weight specs;
families differ only in config, never by branches in here beyond what the
config switches on (biases, q/k norm, shared expert).

Legend: T flat tokens, B sequences, Q padded chunk length, L context, D hidden,
H query heads, G KV heads, d head dim, E experts, K experts per token,
F expert FFN width, C MLA latent, r MLA rotary dims, n MLA non-rotary dims.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import routing
from ..kernels.attention import attend, mla_attend
from ..kernels.linear import linear
from ..kernels.moe import grouped_mm_available, grouped_swiglu, grouped_swiglu_mm, swiglu
from ..kernels.norms import rms_norm
from ..kernels.rotary import apply_rope_full, apply_rope_interleaved
from .batch import BatchMeta
from .config import ModelConfig
from .dispatch import Dispatcher, LocalDispatcher
from .stats import RoutingStats

FEW_ROWS = 4  # routed (token, expert) rows up to which the host-grouped MoE path runs


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Attention(nn.Module):
    """Grouped-query attention over the slot cache, with optional q/k/v/o biases,
    q/k RMSNorm (per head or over the projection) and clip_qkv."""

    def __init__(self, c: ModelConfig, dtype, device):
        super().__init__()
        H, G, d, D = c.num_heads, c.num_kv_heads, c.head_dim, c.hidden_size
        self.H, self.G, self.d, self.eps = H, G, d, c.rms_norm_eps
        self.scale = d ** -0.5
        self.clip = c.clip_qkv
        self.qk_norm = c.qk_norm
        self.rope = apply_rope_interleaved if c.rope.interleaved else apply_rope_full
        self.qkv = _param((H + 2 * G) * d, D, dtype=dtype, device=device)
        self.qkv_bias = _param((H + 2 * G) * d, dtype=dtype, device=device) if c.qkv_bias else None
        self.o = _param(D, H * d, dtype=dtype, device=device)
        self.o_bias = _param(D, dtype=dtype, device=device) if c.o_bias else None
        if c.qk_norm != "none":
            n = d if c.qk_norm == "head" else None
            self.q_norm = _param(n or H * d, dtype=dtype, device=device)
            self.k_norm = _param(n or G * d, dtype=dtype, device=device)

    def forward(self, x, meta: BatchMeta, cos, sin, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        T = x.shape[0]
        H, G, d = self.H, self.G, self.d
        qkv = linear(x, self.qkv, self.qkv_bias)                        # (T, (H + 2G) d)
        if self.qk_norm == "none":
            # q and k sit side by side in the fused projection: one rotary call for both.
            if self.clip:
                qkv = qkv.clamp(-self.clip, self.clip)
            qk = self.rope(qkv[:, :(H + G) * d].view(T, H + G, d), cos, sin)
            q, k, v = qk[:, :H], qk[:, H:], qkv[:, (H + G) * d:].view(T, G, d)
        else:
            q, k, v = qkv.split((H * d, G * d, G * d), dim=-1)
            if self.qk_norm == "full":
                q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
            q, k, v = q.reshape(T, H, d), k.reshape(T, G, d), v.reshape(T, G, d)
            if self.qk_norm == "head":
                q, k = rms_norm(q, self.q_norm, self.eps), rms_norm(k, self.k_norm, self.eps)
            if self.clip:
                q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
            q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
        k_cache, v_cache = cache
        k_cache.view(-1, G, d).index_copy_(0, meta.write_index, k)
        v_cache.view(-1, G, d).index_copy_(0, meta.write_index, v)
        out = meta.attention(lambda q_, k_, v_, m: attend(q_, k_, v_, m, self.scale), (q,), (k_cache, v_cache))
        return linear(out.reshape(T, H * d), self.o, self.o_bias)


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; the cache keeps only the normed
    latent and the rotated shared key per position."""

    def __init__(self, c: ModelConfig, dtype, device, softmax_scale: float):
        super().__init__()
        a, H, D = c.mla, c.num_heads, c.hidden_size
        self.a, self.H, self.eps, self.scale = a, H, c.rms_norm_eps, softmax_scale
        self.rope = apply_rope_interleaved if c.rope.interleaved else apply_rope_full
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            self.q_a = _param(a.q_lora_rank, D, dtype=dtype, device=device)
            self.q_a_norm = _param(a.q_lora_rank, dtype=dtype, device=device)
            self.q_b = _param(H * qk, a.q_lora_rank, dtype=dtype, device=device)
        else:
            self.q = _param(H * qk, D, dtype=dtype, device=device)
        self.kv_a = _param(a.kv_lora_rank + a.qk_rope_head_dim, D, dtype=dtype, device=device)
        self.kv_a_norm = _param(a.kv_lora_rank, dtype=dtype, device=device)
        self.kv_b = _param(H * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, dtype=dtype, device=device)
        self.o = _param(D, H * a.v_head_dim, dtype=dtype, device=device)

    def forward(self, x, meta: BatchMeta, cos, sin, cache: tuple[torch.Tensor, ...]) -> torch.Tensor:
        a, H, T = self.a, self.H, x.shape[0]
        n, r, C = a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        if a.q_lora_rank:
            q = linear(rms_norm(linear(x, self.q_a), self.q_a_norm, self.eps), self.q_b)
        else:
            q = linear(x, self.q)
        q_nope, q_rot = q.view(T, H, n + r).split((n, r), dim=-1)
        latent, k_rot = linear(x, self.kv_a).split((C, r), dim=-1)
        row = torch.cat((rms_norm(latent, self.kv_a_norm, self.eps),
                         self.rope(k_rot.view(T, 1, r), cos, sin).view(T, r)), dim=-1)   # (T, C + r)
        (latent_cache,) = cache
        latent_cache.view(-1, C + r).index_copy_(0, meta.write_index, row)
        w = self.kv_b.view(H, n + a.v_head_dim, C)
        out = meta.attention(lambda qn, qr, lc, m: mla_attend(qn, qr, lc, w[:, :n], w[:, n:], m, self.scale),
                             (q_nope, self.rope(q_rot, cos, sin)), (latent_cache,))
        return linear(out.reshape(T, H * a.v_head_dim), self.o)


class MLP(nn.Module):
    """Dense gated MLP (SwiGLU)."""

    def __init__(self, D: int, F_: int, dtype, device):
        super().__init__()
        self.gate_up = _param(2 * F_, D, dtype=dtype, device=device)
        self.down = _param(D, F_, dtype=dtype, device=device)

    def forward(self, x):
        return swiglu(x, self.gate_up, self.down)


class MoE(nn.Module):
    """route -> dispatch -> grouped expert compute -> combine, plus shared experts.

    Every routed row is computed (no capacity factor); routing statistics go
    into `stats` as device tensors, with no host sync here.
    """

    def __init__(self, c: ModelConfig, layer: int, dispatcher: Dispatcher, stats: RoutingStats, dtype, device,
                 experts: list[int] | None = None):
        """`experts`: the global ids of the routed experts this process holds (an
        expert-parallel shard, in the dispatcher's local order); None holds all."""
        super().__init__()
        m, D = c.moe, c.hidden_size
        self.m, self.layer, self.dispatcher, self.stats = m, layer, dispatcher, stats
        E = m.num_experts
        self.experts = list(range(E)) if experts is None else list(experts)
        self.router = _param(E, D, dtype=dtype, device=device)
        if m.scoring == "sigmoid":  # DeepSeek scores in float32 whatever the model dtype
            self.router_bias = _param(E, dtype=torch.float32, device=device)
            self.route = lambda x: routing.sigmoid_grouped_topk(
                F.linear(x.float(), self.router.float()), m.top_k, self.router_bias, m.n_group, m.topk_group,
                m.renormalize, m.routed_scale)
        else:
            self.route = lambda x: routing.softmax_topk(F.linear(x, self.router), m.top_k, m.renormalize)
        E_local = len(self.experts)   # the router scores all E; only these are computed here
        self.experts_gate_up = _param(E_local, 2 * m.expert_ffn, D, dtype=dtype, device=device)
        self.experts_down = _param(E_local, D, m.expert_ffn, dtype=dtype, device=device)
        if m.shared_ffn:
            self.shared_gate_up = _param(2 * m.shared_ffn, D, dtype=dtype, device=device)
            self.shared_down = _param(D, m.shared_ffn, dtype=dtype, device=device)
            if m.shared_gate:
                self.shared_gate = _param(1, D, dtype=dtype, device=device)
        # Backends chosen once: grouped GEMM with device-side offsets where this torch
        # has it for (device, dtype), else a loop over active experts; and, with all
        # experts local, a host-grouped path for a handful of routed rows (decode at
        # batch 1), where sorting and scattering cost more than the two expert GEMMs.
        if grouped_mm_available(torch.device(device), dtype):
            self.grouped = lambda rows, counts: grouped_swiglu_mm(rows, counts, self.experts_gate_up,
                                                                  self.experts_down)
        else:
            self.grouped = lambda rows, counts: grouped_swiglu(rows, counts.tolist(), self.experts_gate_up,
                                                               self.experts_down)
        self.few_rows = FEW_ROWS if isinstance(dispatcher, LocalDispatcher) else 0

    def _few_rows(self, x, weights, ids):
        """The same sum as dispatch/compute/combine, grouped on the host: each
        active expert runs once on its tokens; contributions are added per token
        in ascending expert order (the order the reference accumulates in)."""
        E = self.m.num_experts
        self.stats.record(self.layer, torch.bincount(ids.view(-1), minlength=E))
        groups: dict[int, list[tuple[int, int]]] = {}
        for t, row in enumerate(ids.tolist()):
            for j, e in enumerate(row):
                groups.setdefault(e, []).append((t, j))
        acc: list[torch.Tensor | None] = [None] * x.shape[0]
        for e in sorted(groups):
            rows = groups[e]
            toks = [t for t, _ in rows]
            xe = x[toks[0]:toks[0] + 1] if len(toks) == 1 else x[toks]
            y = swiglu(xe, self.experts_gate_up[e], self.experts_down[e])
            for r, (t, j) in enumerate(rows):
                c = (y[r:r + 1] * weights[t, j]).to(x.dtype)
                acc[t] = c if acc[t] is None else acc[t] + c
        return acc[0] if len(acc) == 1 else torch.cat(acc)

    def forward(self, x):
        weights, ids = self.route(x)                              # (T, K) float32, (T, K)
        self.stats.record_ids(self.layer, ids)
        if self.few_rows and ids.numel() <= self.few_rows:
            out = self._few_rows(x, weights, ids)
        else:
            d = self.dispatcher.dispatch(x, ids)
            self.stats.record(self.layer, d.counts)
            out = self.dispatcher.combine(self.grouped(d.rows, d.counts), weights, d, x.shape[0])
        if self.m.shared_ffn:
            shared = swiglu(x, self.shared_gate_up, self.shared_down)
            if self.m.shared_gate:
                shared = torch.sigmoid(F.linear(x, self.shared_gate)) * shared
            out = out + shared
        return out
