#!/usr/bin/env python
"""Few-row linears on CPU: F.linear against a transposed weight copy
(kernels/linear.py), per weight shape and rows, and whole batch-1 target
forwards with the copy on (SMALL_ROWS = 3) and off (0), interleaved.

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
    ap.add_argument("--rows", default="1,2,3,4,8")
    ap.add_argument("--models", default="moe-bench,dense-bench,tiny-moe")
    ap.add_argument("--q", default="1,2,3,4,5,9", help="tokens of the batch-1 forwards")
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
        cells = []
        for m in rows:
            x = torch.randn(m, k)
            b = fastest({"linear": lambda: F.linear(x, w), "copy": lambda: torch.mm(x, wt)}, a.rounds, 10)
            cells.append(f"{b['linear'] * 1e3:.2f} / {b['copy'] * 1e3:.2f}")
        print(f"| {shape} (F.linear / transposed copy, ms) | " + " | ".join(cells) + " |")

    paths = {"moe-bench": lambda: build_checkpoint(Path(a.out) / "moe-bench", 0),
             "dense-bench": lambda: build_dense_checkpoint(Path(a.out) / "dense-bench", 0),
             "tiny-moe": lambda: bundled_model("tiny-moe")}
    qs = [int(v) for v in a.q.split(",")]
    print("\nBatch-1 target forward after 40 cached tokens, ms (SMALL_ROWS 0 / 3), every token's logits:\n")
    print("| model | " + " | ".join(f"q={q}" for q in qs) + " |")
    print("|---|" + "---:|" * len(qs))
    for name in a.models.split(","):
        runner = ModelRunner.from_pretrained(paths[name](), max_seqs=1, max_seq_len=64)
        V = runner.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        runner.run([Chunk(0, 0, torch.randint(0, V, (40,), generator=gen).tolist())])
        toks = {q: torch.randint(0, V, (q,), generator=gen).tolist() for q in qs}

        def step(q, small):
            lin.SMALL_ROWS = small
            runner.run([Chunk(0, 40, toks[q])], num_logits=[q], full=[False])
        default = lin.SMALL_ROWS
        try:
            fns = {(q, s): (lambda q=q, s=s: step(q, s)) for q in qs for s in (0, 3)}
            b = fastest(fns, a.rounds, 1)
        finally:
            lin.SMALL_ROWS = default
        print(f"| {name} | " + " | ".join(f"{b[(q, 0)] * 1e3:.2f} / {b[(q, 3)] * 1e3:.2f} "
                                          f"({b[(q, 3)] / b[(q, 0)]:.2f}x)" for q in qs) + " |")


if __name__ == "__main__":
    main()
