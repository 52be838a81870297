"""A linear layer for the few-row steps of decoding on CPU.

On the CPU build of torch (MKL) `F.linear(x, w)` with one to three rows of x
runs a matrix-vector kernel over w's rows that streams a large weight at well
under the memory bandwidth: on the 2-core AMD EPYC VM, one torch thread, the
8192 x 512 LM head of moe-bench took 0.81 / 1.43 / 2.15 ms for 1 / 2 / 3 rows
against 0.42 / 0.85 / 1.02 ms as `x @ w.t().contiguous()`, the same from 4
rows on (scripts/bench_linear.py, docs/BENCHMARKS.md "Session 15"). So on CPU, in float32, a
weight multiplied by at most `SMALL_ROWS` rows goes through a transposed copy
of it, made on first use and again whenever the weight changed (in place, as
a checkpoint load does, or replaced). The copy doubles the memory of the
dense weights that take this path (attention, dense MLPs, shared experts, the
LM head); views (the routed experts, sliced per expert) never do.
"""

import weakref

import torch
import torch.nn.functional as F

SMALL_ROWS = 3          # rows of x up to which the transposed copy is used (0: never)

_copies: dict[int, tuple] = {}      # id(w) -> (weakref to w, w's version, w.t().contiguous())


def transposed(w: torch.Tensor) -> torch.Tensor:
    """w.t().contiguous(), kept while w lives and is unchanged."""
    key = id(w)
    hit = _copies.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    wt = w.detach().t().contiguous()
    _copies[key] = (weakref.ref(w, lambda _, key=key: _copies.pop(key, None)), w._version, wt)
    return wt


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for x (T, in), w (out, in); through w's transposed copy for a few rows on CPU."""
    if x.shape[0] <= SMALL_ROWS and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
            and w._base is None and not w.is_inference():     # an inference tensor keeps no version
        wt = transposed(w)
        return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)
    return F.linear(x, w, b)
