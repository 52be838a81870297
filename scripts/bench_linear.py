#!/usr/bin/env python
"""Few-row linears on CPU: F.linear against a transposed weight copy and a
oneDNN-packed one (kernels/linear.py), per weight shape and rows, and whole
batch-1 target forwards three ways, interleaved: no copies (SMALL_ROWS = 0),
transposed copies for 1-3 rows only (SMALL_ROWS = 3, PACKED off: the setting
before Session 18), and the default (transposed for one row, packed for more).

Every figure is the fastest of --rounds rounds (each round times every
variant in turn), one torch thread unless --threads says otherwise.

    .venv/bin/python scripts/bench_linear.py [--rounds 15] [--models moe-bench,dense-bench,tiny-moe]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def fastest(fns: dict, rounds: int, inner: int) -> dict:
    """{name: the fastest of `rounds` rounds of `inner` calls, seconds a call}; variants in turn per round."""
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default="8192x512,2048x512,512x1024,4096x256", help="weights OUTxIN")
    ap.add_argument("--rows", default="1,2,3,4,5,8,16,64")
    ap.add_argument("--models", default="moe-bench,dense-bench,tiny-moe")
    ap.add_argument("--q", default="1,2,3,4,5,9,17", help="tokens of the batch-1 forwards")
    ap.add_argument("--out", default=".cache", help="where the bench checkpoints are built or found")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from bench_forward import cpu_model
    from make_moe_bench import build_checkpoint, build_dense_checkpoint

    from specmoe.experts.batch import Chunk
    from specmoe.experts.checkpoint import bundled_model
    from specmoe.experts.runner import ModelRunner
    from specmoe.kernels import linear as lin
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.threads} thread(s); "
          f"load average {os.getloadavg()[0]:.2f}")
    rows = [int(v) for v in a.rows.split(",")]
    print("\n| weight | " + " | ".join(f"{m} rows" for m in rows) + " |")
    print("|---|" + "---:|" * len(rows))
    for shape in a.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k)
        wt = w.t().contiguous()
        wp = torch.ops.mkldnn._reorder_linear_weight(w, None) if lin.PACKED else None
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            fns = {"linear": lambda: F.linear(x, w), "copy": lambda: torch.mm(x, wt)}
            if wp is not None:
                fns["packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, wp, None, "none", [], "")
            b = fastest(fns, a.rounds, 10)
            cells.append(" / ".join(f"{b[v] * 1e3:.2f}" for v in fns))
        print(f"| {shape} (F.linear / transposed / packed, ms) | " + " | ".join(cells) + " |")

    paths = {"moe-bench": lambda: build_checkpoint(Path(a.out) / "moe-bench", 0),
             "dense-bench": lambda: build_dense_checkpoint(Path(a.out) / "dense-bench", 0),
             "tiny-moe": lambda: bundled_model("tiny-moe")}
    qs = [int(v) for v in a.q.split(",")]
    print("\nBatch-1 target forward after 40 cached tokens, ms (no copies / transposed for 1-3 rows / default) "
          "and default over each, every token's logits:\n")
    print("| model | " + " | ".join(f"q={q}" for q in qs) + " |")
    print("|---|" + "---:|" * len(qs))
    for name in a.models.split(","):
        runner = ModelRunner.from_pretrained(paths[name](), max_seqs=1, max_seq_len=64)
        V = runner.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        runner.run([Chunk(0, 0, torch.randint(0, V, (40,), generator=gen).tolist())])
        toks = {q: torch.randint(0, V, (q,), generator=gen).tolist() for q in qs}

        default, packed = lin.SMALL_ROWS, lin.PACKED
        ways = {"off": (0, False), "transposed": (3, False), "default": (lin.DEFAULT_ROWS, packed)}

        def step(q, way):
            lin.SMALL_ROWS, lin.PACKED = ways[way]
            runner.run([Chunk(0, 40, toks[q])], num_logits=[q], full=[False])
        try:
            fns = {(q, w): (lambda q=q, w=w: step(q, w)) for q in qs for w in ways}
            b = fastest(fns, a.rounds, 1)
        finally:
            lin.SMALL_ROWS, lin.PACKED = default, packed
        print(f"| {name} | " + " | ".join(
            " / ".join(f"{b[(q, w)] * 1e3:.2f}" for w in ways)
            + f" ({b[(q, 'default')] / b[(q, 'off')]:.2f}x, {b[(q, 'default')] / b[(q, 'transposed')]:.2f}x)"
            for q in qs) + " |")


if __name__ == "__main__":
    main()
