#!/usr/bin/env python
"""Expert compute of one MoE layer in isolation: the per-expert GEMM loop
(kernels.moe.grouped_swiglu) vs one grouped GEMM per projection
(grouped_swiglu_mm), moe-bench shapes (32 experts, D=F=512, top-2), float32,
interleaved, median of --reps. Also checks the two agree.

    .venv/bin/python scripts/bench_moe_kernels.py [--tokens 1,2,4,8,16,64] [--reps 7]
"""

import argparse
import os
import statistics
import sys
import time

import torch

from specmoe.kernels.moe import grouped_mm_available, grouped_swiglu, grouped_swiglu_mm, sort_by_expert


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,2,4,8,16,64")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    print("command:", " ".join(sys.argv), f"| cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    if not grouped_mm_available(torch.device("cpu"), torch.float32):
        sys.exit("grouped_mm is not available in this torch build")
    E, D, F = 32, 512, 512
    g = torch.Generator().manual_seed(0)
    wgu, wd = torch.randn(E, 2 * F, D, generator=g) * 0.05, torch.randn(E, D, F, generator=g) * 0.05
    print("| tokens | routed rows | loop ms | grouped_mm ms | loop / grouped_mm | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for T in map(int, a.tokens.split(",")):
        ids = torch.randint(0, E, (T, 2), generator=g)
        _, counts = sort_by_expert(ids, E)
        x = torch.randn(2 * T, D, generator=g)
        fns = {"loop": lambda: grouped_swiglu(x, counts.tolist(), wgu, wd),
               "gmm": lambda: grouped_swiglu_mm(x, counts, wgu, wd)}
        diff = (fns["loop"]() - fns["gmm"]()).abs().max().item()
        times = {k: [] for k in fns}
        for _ in range(a.reps):
            for k, fn in fns.items():
                fn()
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    fn()
                times[k].append((time.perf_counter() - t0) / a.iters * 1e3)
        lo, gm = statistics.median(times["loop"]), statistics.median(times["gmm"])
        print(f"| {T} | {2 * T} | {lo:.3f} | {gm:.3f} | {lo / gm:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
