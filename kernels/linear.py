"""A linear layer for the few-row steps of decoding and verification on CPU.

On the CPU build of torch, `F.linear(x, w)` runs MKL, whose kernels stream a
large weight at well under the memory bandwidth when x has few rows. Two
prepared copies of a dense weight do better (one torch thread, 2-core AMD EPYC
VM, scripts/bench_linear.py, docs/BENCHMARKS.md "Session 18"):
- one row: `x @ w.t().contiguous()` (the 8192 x 512 LM head of moe-bench,
  0.81 ms as F.linear against 0.42 ms, Session 15);
- two rows and more: the weight reordered once into oneDNN's blocked layout
  and multiplied by oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`, the
  op torch's own compiler fuses CPU linears into), which ran 1.2-4.6x faster than
  F.linear at 2-64 rows.
So on CPU, in float32, a weight multiplied by at most `SMALL_ROWS` rows goes
through the copy for its row count, made on first use and again whenever the
weight changed (in place, as a checkpoint load does, or replaced). The copies
cost memory: the dense weights that take this path (attention, dense MLPs,
shared experts, the LM head) are held up to three times. A routed expert, a
slice of its layer's stacked weights, goes through `expert_linear`: from two
rows on a packed copy of that expert alone, so every expert that has seen two
rows is held twice; one row takes F.linear. Where this torch build has no
oneDNN, 2-3 rows of a dense weight take the transposed copy and more rows
F.linear, as do the experts.

`SMALL_ROWS` is a setting of the process, set with `set_small_rows` from the
engine option `few_row_linears` where forwards run (ModelRunner.from_pretrained;
under expert parallelism the EPRunner and every EP worker, each in its own
process): 0 makes no copies, 1 only the transposed ones, so a large model on
CPU can keep one copy of its dense weights.
"""

import weakref

import torch
import torch.nn.functional as F

DEFAULT_ROWS = 512      # the few_row_linears default: the rows measured, and past a batch of 64 verifying k = 7
SMALL_ROWS = DEFAULT_ROWS   # rows of x up to which a prepared copy is used in this process (0: never)
MV_ROWS = 3             # without oneDNN, rows up to which the transposed copy beats F.linear (MKL's slow range)
PACKED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")     # oneDNN's linear is in this build

_copies: dict[tuple, tuple] = {}   # (id(w), "t" | "packed" | expert index) -> (weakref to w, w's version, copy)


def check_rows(rows, name: str = "few_row_linears") -> int:
    """rows if it is an integer >= 0 (0: no copies), else a ValueError naming the option."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"{name} must be an integer >= 0 (rows up to which a dense weight goes through a "
                         f"prepared copy on CPU; 0: no copies), got {rows!r}")
    return rows


def set_small_rows(rows: int) -> None:
    """Set SMALL_ROWS for this process (see check_rows); copies no row count can reach any more are dropped."""
    global SMALL_ROWS
    SMALL_ROWS = check_rows(rows)
    if SMALL_ROWS < 2:
        for key in [key for key in list(_copies) if SMALL_ROWS == 0 or key[1] != "t"]:
            _copies.pop(key, None)


def copies() -> tuple[int, int]:
    """(prepared copies held in this process, their bytes as dense float32)."""
    held = [hit[2] for hit in list(_copies.values())]
    return len(held), sum(t.numel() * t.element_size() for t in held)


def prepared(w: torch.Tensor, kind: str | int = "t") -> torch.Tensor:
    """w.t().contiguous() ("t"), w in oneDNN's layout ("packed") or w[kind] in it (an expert of a
    stacked weight), kept while w lives and is unchanged."""
    key = (id(w), kind)
    hit = _copies.get(key)
    if hit is not None and hit[0]() is w and hit[1] == w._version:
        return hit[2]
    if kind == "t":
        made = w.detach().t().contiguous()
    else:
        made = torch.ops.mkldnn._reorder_linear_weight(w.detach() if kind == "packed" else w.detach()[kind], None)
    _copies[key] = (weakref.ref(w, lambda _, key=key: _copies.pop(key, None)), w._version, made)
    return made


def transposed(w: torch.Tensor) -> torch.Tensor:
    """w.t().contiguous(), kept while w lives and is unchanged."""
    return prepared(w, "t")


def _copyable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """x (T, in) on CPU in float32, at most SMALL_ROWS rows, times a weight that owns its storage and
    keeps a version (an inference tensor does not), so a copy of it can follow its changes."""
    return x.shape[0] <= SMALL_ROWS and x.dim() == 2 and x.device.type == "cpu" and x.dtype == torch.float32 \
        and w._base is None and not w.is_inference()


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, b) for x (T, in), w (out, in); through a prepared copy of w for up to SMALL_ROWS rows on CPU."""
    rows = x.shape[0]
    if _copyable(x, w):
        if rows > 1 and PACKED:
            return torch.ops.mkldnn._linear_pointwise(x, prepared(w, "packed"), b, "none", [], "")
        if rows <= MV_ROWS:
            wt = prepared(w, "t")
            return torch.mm(x, wt) if b is None else torch.addmm(b, x, wt)
    return F.linear(x, w, b)


def expert_linear(x: torch.Tensor, stack: torch.Tensor, e: int) -> torch.Tensor:
    """F.linear(x, stack[e]) for x (T, in), stack (E, out, in); from two rows up to SMALL_ROWS on CPU
    through a oneDNN-packed copy of expert e alone."""
    if x.shape[0] > 1 and PACKED and _copyable(x, stack):
        return torch.ops.mkldnn._linear_pointwise(x, prepared(stack, e), None, "none", [], "")
    return F.linear(x, stack[e])
