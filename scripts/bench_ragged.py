#!/usr/bin/env python
"""What a ragged plan costs: one sequence drafting deep against the same
extra tokens spread over several sequences, measured and as the cost model
prices it.

Padded attention (every chunk padded to the longest: B x Q_max x L_max)
makes one sequence of k+1 = 8 tokens among sequences of 1 lengthen every
sequence's queries, while the cost model's attention feature sums each
sequence's own query-key pairs; the engine now attends a ragged batch in
parts of equal chunk length instead. This script times, on moe-bench
(scripts/make_moe_bench.py) with one torch thread, verification-shaped steps
at batch B after --ctx cached tokens per sequence:

- base: every sequence q = --q tokens;
- deep e: one sequence q + e, the rest q (e more tokens, Q_max = q + e);
- spread e: e sequences q + 1, the rest q (the same e more tokens, Q_max = q + 1);

INTERLEAVED (step i of every shape before step i + 1 of any), each shape's
figure the median over --steps. The cost model is profiled on the same
runner first (as the controller does at start-up) and prices every shape
with the distinct experts measured in its steps, so the experts' share of
the difference is priced as it happened and what is left is the padding.
Every step runs once per --variant, interleaved: "split" is the engine now
(a ragged batch attends one part per chunk length, experts/batch.py; grouped
query heads packed into their KV head's rows, kernels/attention.py), "pad"
pads every chunk to the longest as before, "per-head" is also padded with
one SDPA head per query head (the attention before both changes). The price
is the same model's (profiled with "split") for all.

- mixed N (with --mixed N[,N]): chunk lengths q - d and q + d, d = 1..N in turn,
  the base's tokens in 2N parts, the way a plan of per-request depths runs.

    .venv/bin/python scripts/bench_ragged.py [--batch 16,64] [--q 2] [--extra 3,6] [--ctx 48] [--ctx-spread 0]
        [--mixed 1,3] [--steps 40] [--variant split,pad,per-head]
"""

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def per_head_attend(q, k, v, mask, scale):
    """The attention before kernels.attention packed grouped heads (one SDPA head per query head,
    enable_gqa): the A/B baseline of --attention per-head."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def shapes(B: int, q: int, extras: list[int], mixed: tuple[int, ...] = ()) -> dict[str, list[int]]:
    out = {"base": [q] * B}
    for e in extras:
        out[f"deep {e}"] = [q + e] + [q] * (B - 1)
        if e <= B:
            out[f"spread {e}"] = [q + 1] * e + [q] * (B - e)
    for m in mixed:     # pairs (q - d, q + d), d = 1..m in turn: 2m chunk lengths, the base's tokens (B even)
        pairs = [n for d in range(1, m + 1) for n in (q - d, q + d)]
        out[f"mixed {m}"] = [pairs[i % len(pairs)] for i in range(B)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="16,64")
    ap.add_argument("--q", type=int, default=2, help="tokens per sequence in the base step (k + 1)")
    ap.add_argument("--extra", default="3,6", help="extra tokens of the deep (one sequence) and spread shapes")
    ap.add_argument("--ctx", type=int, default=48, help="cached tokens per sequence before each step")
    ap.add_argument("--ctx-spread", type=int, default=0,
                    help="sequence s starts at ctx - s %% (spread + 1): unequal contexts, as in serving (a mask in "
                         "every step; 0: equal contexts, so a step of one token each needs none)")
    ap.add_argument("--mixed", default="",
                    help="N[,N]: also the shapes 'mixed N': chunk lengths q - d and q + d for d = 1..N in turn (2N "
                         "parts, the base's tokens at an even batch), as a plan of per-request depths runs (q > N)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--variant", default="split,pad",
                    help="split (attention per chunk length, grouped heads packed: now), pad (every chunk padded "
                         "to the longest), per-head (padded, one SDPA head per query head: before both), "
                         "interleaved")
    ap.add_argument("--out", default=".cache", help="where moe-bench is built or found")
    a = ap.parse_args()
    torch.set_num_threads(1)
    batches = [int(v) for v in a.batch.split(",")]
    extras = [int(v) for v in a.extra.split(",")]
    mixed = tuple(int(v) for v in a.mixed.split(",") if v)
    if mixed and (max(mixed) >= a.q or any(B % 2 for B in batches)):
        ap.error(f"--mixed {a.mixed} needs --q above it and even batches")
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, 1 thread; load average "
          f"{os.getloadavg()[0]:.2f}")
    from make_moe_bench import build_checkpoint

    from specmoe.experts.batch import Chunk
    from specmoe.experts.runner import ModelRunner
    from specmoe.router.cost_model import CostModel

    B_max = max(batches)
    runner = ModelRunner.from_pretrained(build_checkpoint(Path(a.out) / "moe-bench", 0), max_seqs=B_max,
                                         max_seq_len=a.ctx + a.q + max(extras + list(mixed)) + 8)
    cost = CostModel(runner.config, decode_tokens=a.q + max(extras + list(mixed)))
    cost.profile(runner, log=print)
    V = runner.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, V, (n,), generator=gen).tolist()  # noqa: E731
    runner.run([Chunk(s, 0, rand(a.ctx)) for s in range(B_max)])        # every slot's context, once
    variants = a.variant.split(",")
    layers = importlib.import_module("specmoe.experts.layers")
    batch = importlib.import_module("specmoe.experts.batch")
    impl = {"split": ("split", layers.attend), "pad": ("pad", layers.attend), "per-head": ("pad", per_head_attend)}
    bad = [v for v in variants if v not in impl]
    if bad:
        ap.error(f"--variant {bad[0]!r}: expected split, pad or per-head")
    for B in batches:
        shp = shapes(B, a.q, extras, mixed)
        times = {(v, k): [] for v in variants for k in shp}
        experts = {k: [] for k in shp}
        ctx = [a.ctx - s % (a.ctx_spread + 1) for s in range(B)]
        for i in range(a.steps + 2):                                     # two warm-up rounds
            for v in variants:
                batch.RAGGED_ATTENTION, layers.attend = impl[v]
                for name, q in shp.items():
                    chunks = [Chunk(s, c, rand(n)) for s, (c, n) in enumerate(zip(ctx, q))]
                    t0 = time.perf_counter()
                    o = runner.run(chunks, routing=True, num_logits=q, full=[False] * B)
                    t = time.perf_counter() - t0
                    if i >= 2:
                        times[v, name].append(t)
                        experts[name].append(sum(o.routing.distinct_experts))
        batch.RAGGED_ATTENTION, layers.attend = impl["split"]
        base_x = cost.target_features(shp["base"], ctx)
        base_x[3] = statistics.median(experts["base"])
        base_p = float(cost.c @ base_x)
        print(f"\nbatch {B}, q {a.q}, context {min(ctx)}-{max(ctx)}: medians over {a.steps} interleaved steps")
        print("\n| variant | shape | tokens | Q_max | step ms | over base ms | priced over base ms | priced / measured "
              "| attention units summed | padded (B x Q_max x L_max / 1000) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for v in variants:
            base_t = statistics.median(times[v, "base"])
            for name, q in shp.items():
                t = statistics.median(times[v, name])
                x = cost.target_features(q, ctx)
                x[3] = statistics.median(experts[name])
                p = float(cost.c @ x)
                padded = B * max(q) * max(c + n for c, n in zip(ctx, q)) / 1000.0
                d_t, d_p = (t - base_t) * 1e3, (p - base_p) * 1e3
                ratio = f"{d_p / d_t:.2f}" if name != "base" and abs(d_t) > 1e-3 else "-"
                print(f"| {v} | {name} | {sum(q)} | {max(q)} | {t * 1e3:.2f} | {d_t:+.2f} | {d_p:+.2f} | {ratio} "
                      f"| {x[4]:.1f} | {padded:.1f} |")
    print(f"\ncost model coefficients: attn {cost.c[4] * 1e6:.2f} us per unit, tokens {cost.c[2] * 1e6:.1f} us, "
          f"experts {cost.c[3] * 1e6:.2f} us")


if __name__ == "__main__":
    main()
