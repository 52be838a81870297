"""Token permutation and grouped expert FFN.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts (local),
D hidden, F expert FFN width.

The fast path sorts the N (token, expert) rows by expert and runs one pair of
GEMMs per active expert, so each active expert's weights are read once per
forward; no capacity factor, no dropped rows.
"""

import torch
import torch.nn.functional as F

from .linear import expert_linear, linear


def sort_by_expert(ids: torch.Tensor, num_experts: int):
    """ids (T, K) -> order (N,) row indices into the flattened (T*K) pairs sorted
    by expert (stable), counts (E,) rows per expert."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_swiglu(x: torch.Tensor, counts: list[int], w_gate_up: torch.Tensor,
                   w_down: torch.Tensor) -> torch.Tensor:
    """x (N, D) rows already grouped by expert with `counts` rows each ->
    (N, D). w_gate_up (E, 2F, D), w_down (E, D, F)."""
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = expert_linear(x[start:start + n], w_gate_up, e)
        g, u = h.chunk(2, dim=-1)
        out[start:start + n] = expert_linear(F.silu(g) * u, w_down, e)
        start += n
    return out


# The public name from torch 2.10, the private one before; None where neither exists.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch has a grouped GEMM kernel for (device, dtype); probed
    with a tiny call, so a missing kernel falls back instead of failing later."""
    fn = _GROUPED_MM
    if fn is None:
        return False
    try:
        a = torch.ones(4, 16, device=device, dtype=dtype)
        b = torch.ones(2, 16, 16, device=device, dtype=dtype)
        out = fn(a, b, offs=torch.tensor([1, 4], device=device, dtype=torch.int32))
        return bool(torch.allclose(out.float(), torch.full((4, 16), 16.0, device=device)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def grouped_swiglu_mm(x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor,
                      w_down: torch.Tensor) -> torch.Tensor:
    """grouped_swiglu with one grouped GEMM per projection: the group offsets
    stay on the device, so there is no host sync. counts (E,) on x's device."""
    offs = counts.cumsum(0, dtype=torch.int32)
    g, u = _GROUPED_MM(x, w_gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return _GROUPED_MM(F.silu(g) * u, w_down.transpose(1, 2), offs=offs)


def swiglu(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Dense gated MLP: x (T, D), w_gate_up (2F, D), w_down (D, F)."""
    g, u = linear(x, w_gate_up).chunk(2, dim=-1)
    return linear(F.silu(g) * u, w_down)


def moe_reference(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """Token-by-token reference: sum_k weights[t,k] * expert_{ids[t,k]}(x[t])."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y = swiglu(x[t:t + 1], w_gate_up[e], w_down[e])
            out[t] += weights[t, j].float() * y[0].float()
    return out.to(x.dtype)
