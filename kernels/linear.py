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

`SMALL_ROWS` is a setting of the process, set with `set_small_rows` from the
engine option `few_row_linears` where forwards run (ModelRunner.from_pretrained;
under expert parallelism the EPRunner and every EP worker, each in its own
process); 0 turns the copies off, so a large model on CPU keeps one copy of
its dense weights.
"""

import weakref

import torch
import torch.nn.functional as F

DEFAULT_ROWS = 3        # the few_row_linears default: MKL's matrix-vector kernel is slow for 1-3 rows
SMALL_ROWS = DEFAULT_ROWS   # rows of x up to which the transposed copy is used in this process (0: never)

_copies: dict[int, tuple] = {}      # id(w) -> (weakref to w, w's version, w.t().contiguous())


def check_rows(rows, name: str = "few_row_linears") -> int:
    """rows if it is an integer >= 0 (0: no copies), else a ValueError naming the option."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"{name} must be an integer >= 0 (rows up to which a dense weight goes through its "
                         f"transposed copy on CPU; 0: no copies), got {rows!r}")
    return rows


def set_small_rows(rows: int) -> None:
    """Set SMALL_ROWS for this process (see check_rows); at 0 the copies made so far are dropped too."""
    global SMALL_ROWS
    SMALL_ROWS = check_rows(rows)
    if SMALL_ROWS == 0:
        _copies.clear()


def copies() -> tuple[int, int]:
    """(transposed copies held in this process, their bytes)."""
    held = [hit[2] for hit in list(_copies.values())]
    return len(held), sum(t.numel() * t.element_size() for t in held)


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
