#!/usr/bin/env python
"""The start-up profile's price of verification-shaped steps against their
measured time, per profile variant.

The controller decides between step shapes of the batch running now: B
sequences of 1 (no drafts) to k_max + 1 tokens each. Its prices come from the
start-up profile (router/cost_model.py `CostModel.profile`) and are then
corrected online; where the profile misprices the increments between those
shapes (k -> k + 1 for every request), the plan drafts too deep or too
shallow until the corrections catch up, and a short run never gets there.
This script times, on moe-bench (scripts/make_moe_bench.py) with one torch
thread, steps of B sequences x q tokens after --ctx cached tokens (each
shape's figure the median over --rounds rounds, every shape once per round),
profiles a fresh CostModel --profiles times per variant (variants in turn),
and prints per variant and increment the priced / measured extra time:
median over the profiles and its range. The distinct experts of each shape
are the measured ones, so what differs is the price per token, sequence and
attention unit.

Variants of the profile (its large points, `_profile_large`, unless said):
- "long": up to 32 sequences, chunks as long as ~384 and ~128 tokens need
  (12 and 4 tokens a sequence), as before;
- "decode": up to 64 sequences, chunks at most k_max + 1 tokens (6, 2 and 1
  at 64 sequences): the shapes the plan chooses between;
- "decode32": 32 sequences, chunks at most k_max + 1 tokens (9, 4 and 1);
- "long+64": "long" with a point of 64 tokens (32 x 2) added, between the
  knees of 32 and 64 tokens that the profiles pick in turn;
- "free": the per-expert coefficient fitted with the rest, not pinned to the
  expert micro-profile (`CostModel.pin_experts`);
- "wide": the short forwards at up to 8 sequences, not 4 (`forward_seqs`);
- "wide+free": both.

    .venv/bin/python scripts/bench_profile.py [--batch 16,64] [--q 1,2,4,7] [--profiles 4] [--rounds 8]
        [--variant long,decode]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {"long": {}, "decode": dict(large_seqs=64, large_decode=True),
            "decode32": dict(large_decode=True), "long+64": dict(large_sizes=(384, 128, 64, 1)),
            "free": dict(pin_experts=False), "wide": dict(forward_seqs=16),
            "wide+free": dict(forward_seqs=16, pin_experts=False)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="16,64")
    ap.add_argument("--q", default="1,2,4,7", help="tokens per sequence of the measured shapes (k + 1)")
    ap.add_argument("--ctx", type=int, default=40)
    ap.add_argument("--profiles", type=int, default=4, help="profiles per variant")
    ap.add_argument("--rounds", type=int, default=8, help="measured rounds (half before the profiles, half after)")
    ap.add_argument("--variant", default="long,decode", help=", ".join(VARIANTS))
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--out", default=".cache", help="where moe-bench is built or found")
    a = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(v) for v in a.batch.split(",")]
    qs = sorted(int(v) for v in a.q.split(","))
    variants = a.variant.split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"--variant {bad[0]!r}: expected one of {', '.join(VARIANTS)}")
    if max(qs) > a.k_max + 1:
        ap.error(f"--q {max(qs)} is no verification of k_max {a.k_max}")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; load average "
          f"{os.getloadavg()[0]:.2f}")
    from make_moe_bench import build_checkpoint

    from specmoe.experts.batch import Chunk
    from specmoe.experts.runner import ModelRunner
    from specmoe.router.cost_model import CostModel

    B_max = max(max(batches), 64)
    runner = ModelRunner.from_pretrained(build_checkpoint(Path(a.out) / "moe-bench", 0), max_seqs=B_max,
                                         max_seq_len=max(a.ctx + max(qs), 16 + 384 // 32) + 8)
    V = runner.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, V, (n,), generator=gen).tolist()  # noqa: E731
    shapes = [(B, q) for B in batches for q in qs]
    times = {s: [] for s in shapes}
    experts = {s: [] for s in shapes}

    def measure(rounds):
        runner.run([Chunk(s, 0, rand(a.ctx)) for s in range(max(batches))])     # the context (a profile
        for i in range(rounds + 1):                                             # overwrote it); round 0 warms
            for B, q in shapes:
                t0 = time.perf_counter()
                o = runner.run([Chunk(s, a.ctx, rand(q)) for s in range(B)], routing=True, num_logits=[q] * B,
                               full=[False] * B)
                t = time.perf_counter() - t0
                if i:
                    times[B, q].append(t)
                    experts[B, q].append(sum(o.routing.distinct_experts))

    measure(a.rounds // 2)
    priced = {v: [] for v in variants}       # variant -> [{shape: seconds}] per profile
    knees = {v: [] for v in variants}
    t_prof = time.perf_counter()
    for r in range(a.profiles):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            cm = CostModel(runner.config, decode_tokens=a.k_max + 1)
            for name, value in VARIANTS[v].items():
                setattr(cm, name, value)
            cm.profile(runner)
            priced[v].append(cm)
            knees[v].append(cm.knee)
    t_prof = time.perf_counter() - t_prof
    measure(a.rounds - a.rounds // 2)
    meas = {s: statistics.median(x) for s, x in times.items()}
    print(f"\n{a.profiles} profiles per variant in turn ({t_prof:.0f} s); measured shapes: {a.rounds} rounds, "
          f"half before the profiles and half after, context {a.ctx}\n")
    print("| B | q | measured ms | " + " | ".join(f"{v}: priced ms (range)" for v in variants) + " |")
    print("|---:|---:|---:|" + "---:|" * len(variants))
    price = {}
    for v in variants:
        for i, cm in enumerate(priced[v]):
            for B, q in shapes:
                x = cm.target_features([q] * B, [a.ctx] * B)
                x[3] = statistics.median(experts[B, q])
                price[v, i, B, q] = float(cm.c @ x)
    for B, q in shapes:
        cells = []
        for v in variants:
            ps = [price[v, i, B, q] * 1e3 for i in range(a.profiles)]
            cells.append(f"{statistics.median(ps):.1f} ({min(ps):.1f}-{max(ps):.1f})")
        print(f"| {B} | {q} | {meas[B, q] * 1e3:.1f} | " + " | ".join(cells) + " |")
    print("\nIncrements (every sequence q -> q'), priced / measured extra time: median over the profiles "
          "(range)\n")
    print("| B | q -> q' | measured extra ms | " + " | ".join(variants) + " |")
    print("|---:|---|---:|" + "---:|" * len(variants))
    summary = {v: [] for v in variants}
    for B in batches:
        for q0, q1 in zip(qs, qs[1:]):
            dm = meas[B, q1] - meas[B, q0]
            cells = []
            for v in variants:
                rs = [(price[v, i, B, q1] - price[v, i, B, q0]) / dm for i in range(a.profiles)]
                summary[v].append(statistics.median(rs))
                cells.append(f"{statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})")
            print(f"| {B} | {q0} -> {q1} | {dm * 1e3:.1f} | " + " | ".join(cells) + " |")
    print()
    for v in variants:
        errs = [abs(r - 1) for r in summary[v]]
        print(f"{v}: knees {sorted(knees[v])}; increments' median |priced / measured - 1| "
              f"{statistics.median(errs):.2f}, worst {max(errs):.2f}")


if __name__ == "__main__":
    main()
