#!/usr/bin/env python
"""Batch 1 with the real drafters on the bundled trained pair: speculation
"auto" against "off" and fixed k, engines interleaved in one run (order
rotated each repetition), each generating --new-tokens greedy tokens for
each prompt of bench_vs_transformers.py. Reports tokens/s (median over
repetitions after --warmup), the median of the paired per-repetition ratios
to "off", and steps / drafted / accepted of the last repetition. A second
"off" engine ("off2") shows how far two identical engines drift apart on
this machine: differences smaller than that are noise. --held-out N runs N
held-out prompts of 64 tokens (scripts/eval_bundled.py) instead: text the
model did not train on, where n-gram matches are rarer and shorter;
--drafters picks the drafters' engines (fixed k = --ks and auto each).

    .venv/bin/python scripts/bench_auto_batch1.py [--reps 12] [--warmup 2] [--threads 1] [--new-tokens 64]
        [--held-out 0] [--drafters ngram,draft_model] [--ks 4]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import cpu_model, loadavg  # noqa: E402
from bench_spec import git_revision, rotate  # noqa: E402
from bench_vs_transformers import PROMPTS  # noqa: E402
from eval_bundled import held_out_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "experts/bundled/tiny-moe"))
    ap.add_argument("--draft", default=str(ROOT / "experts/bundled/tiny-draft"))
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="repetitions run first and not counted")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared machine)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--held-out", type=int, default=0, help="N held-out prompts of 64 tokens instead of the two")
    ap.add_argument("--drafters", default="ngram,draft_model")
    ap.add_argument("--ks", default="4", help="fixed draft lengths to compare")
    a = ap.parse_args()
    drafters = a.drafters.split(",")
    if set(drafters) - {"ngram", "draft_model"}:
        raise SystemExit(f"--drafters: choose from ngram, draft_model (got {a.drafters})")
    ks = [int(k) for k in a.ks.split(",")]
    torch.set_num_threads(a.threads)
    from specmoe import Engine, SamplingParams
    D = a.draft
    specs = {"off": None, "off2": None}
    if "ngram" in drafters:
        specs.update({f"ngram k={k}": {"method": "ngram", "k": k} for k in ks})
        specs["ngram auto (k<=8)"] = {"method": "ngram", "k": 8, "auto": True}
    if "draft_model" in drafters:
        specs.update({f"draft_model k={k}": {"method": "draft_model", "k": k, "draft_model": D} for k in ks})
        specs["draft_model auto (k<=8)"] = {"method": "draft_model", "k": 8, "draft_model": D, "auto": True}
        specs["draft_model auto (k<=8) conf 0.4"] = {"method": "draft_model", "k": 8, "draft_model": D,
                                                     "auto": True, "min_confidence": 0.4}
    print("command:", " ".join([sys.executable, *sys.argv]))
    engines = {n: Engine.from_pretrained(a.target, max_batch=1, max_seq_len=1024,
                                         **({"speculation": s} if s else {})) for n, s in specs.items()}
    tok = engines["off"].tokenizer
    prompts = held_out_prompts(tok, a.held_out, 64) if a.held_out else [tok.encode(p).ids for p in PROMPTS]
    print(f"machine: {cpu_model()}, load average {loadavg()}; commit {git_revision()}; torch threads "
          f"{torch.get_num_threads()}; {a.new_tokens} new tokens x {len(prompts)} "
          f"{'held-out ' if a.held_out else ''}prompts, greedy, batch 1")
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    names = list(engines)
    times = {n: [] for n in names}
    stats, outs = {}, {}
    for rep in range(a.warmup + a.reps):
        for n in rotate(names, rep):
            t0 = time.perf_counter()
            done = [engines[n].generate([p], params)[0] for p in prompts]
            dt = time.perf_counter() - t0
            if rep >= a.warmup:
                times[n].append(dt)
            outs[n] = [c.token_ids for c in done]
            stats[n] = tuple(sum(getattr(c.stats, f) for c in done) for f in ("steps", "draft_tokens",
                                                                              "accepted_tokens"))
    same = all(outs[n] == outs["off"] for n in names)
    total = a.new_tokens * len(prompts)
    print(f"\nall outputs identical to off: {same}\n")
    print("| engine | tok/s median | x off (median of paired ratios) | steps | drafted | accepted |")
    print("|---|---:|---:|---:|---:|---:|")
    for n in names:
        ratio = statistics.median(o / t for o, t in zip(times["off"], times[n]))
        print(f"| {n} | {total / statistics.median(times[n]):.0f} | {ratio:.3f} | " + " | ".join(map(str, stats[n]))
              + " |")
    print(f"\nload average at the end: {loadavg()}")
    if not same:
        sys.exit("outputs differ from off")


if __name__ == "__main__":
    main()
