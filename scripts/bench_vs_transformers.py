#!/usr/bin/env python
"""Batch 1, greedy: specmoe's draft-model and n-gram speculation against
transformers' assisted generation (same draft model) and prompt lookup on the
same checkpoint, by default the bundled trained pair (experts/bundled), whose
draft really predicts the target. Methods interleaved, median of --reps;
outputs checked identical token for token.

transformers' assisted generation reads its drafting settings from the
assistant's generation_config (keyword arguments to generate() do not reach
it), so it runs twice: with its defaults (up to 20 drafts per step, drafting
stops once the assistant's top probability falls below 0.4; no scikit-learn,
so that threshold stays fixed) and with k fixed like specmoe (num_assistant_tokens
= k, schedule "constant", confidence threshold 0). specmoe's draft model runs
the same two ways: k fixed, and like transformers' defaults (up to
--conf-k drafts, drafting stopped after a draft the draft model gives less than
--min-confidence, 0.4 as transformers). The goal ratio is taken between the
faster configuration of each. Drafted / accepted / steps of transformers are
counted by wrapping its candidate generators' update_candidate_strategy.

    .venv/bin/python scripts/bench_vs_transformers.py [--target DIR --draft DIR] [--k 4] [--new-tokens 64] [--reps 7]
        [--conf-k 20] [--min-confidence 0.4] [--threads N]

--threads sets torch's intra-op threads for both sides (default: torch's own,
one per core). On a 2-core machine shared with another torch process, two
threads each oversubscribe the cores and OpenMP's waiting makes single
repetitions 10-100x slower at random; one thread each does not.
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ['def read_config(path):\n    """Read a JSON file and return a dict."""\n    with open(path) as f:\n',
           'class Stack:\n    """A last-in first-out stack."""\n\n    def __init__(self):\n        self._items = []\n\n']


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "experts/bundled/tiny-moe"))
    ap.add_argument("--draft", default=str(ROOT / "experts/bundled/tiny-draft"))
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--conf-k", type=int, default=20, help="specmoe's confidence-stopped draft model: most drafts")
    ap.add_argument("--min-confidence", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--small-rows", type=int, default=None,
                    help="specmoe's few_row_linears (kernels/linear.py; 0: plain F.linear; default "
                         "kernels.linear.DEFAULT_ROWS), for an A/B of it")
    ap.add_argument("--onednn", choices=("on", "off"), default="on",
                    help="off: no oneDNN-packed copies, 2-3 rows take the transposed copy and more rows F.linear "
                         "(kernels.linear.PACKED = False; as before Session 18), for an A/B of it")
    a = ap.parse_args()
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    from specmoe import CompletionStats, Engine, SamplingParams

    print("command:", " ".join([sys.executable, *sys.argv]))
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {cpu}; os.cpu_count()={os.cpu_count()}, torch threads {torch.get_num_threads()}; "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"target {a.target}, draft {a.draft}, k {a.k}, {a.new_tokens} new tokens, greedy, batch 1, float32")
    from bench_spec import HFAcceptance   # scripts/ is on sys.path when this file runs as a script

    hf_t = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32).eval()
    hf_d = AutoModelForCausalLM.from_pretrained(a.draft, dtype=torch.float32).eval()       # its defaults
    hf_dk = AutoModelForCausalLM.from_pretrained(a.draft, dtype=torch.float32).eval()      # k fixed, like specmoe
    hf_dk.generation_config.num_assistant_tokens = a.k
    hf_dk.generation_config.num_assistant_tokens_schedule = "constant"
    hf_dk.generation_config.assistant_confidence_threshold = 0.0
    acc = HFAcceptance()
    cap = 1024
    few = {} if a.small_rows is None else {"few_row_linears": a.small_rows}
    if a.onednn == "off":
        from specmoe.kernels import linear as few_rows
        few_rows.PACKED = False
    print(f"few_row_linears {'default' if a.small_rows is None else a.small_rows}, oneDNN-packed copies {a.onednn}")
    engines = {"draft_model": Engine.from_pretrained(a.target, max_batch=1, max_seq_len=cap, **few, speculation={
                   "method": "draft_model", "k": a.k, "draft_model": a.draft}),
               "draft_model conf": Engine.from_pretrained(a.target, max_batch=1, max_seq_len=cap, **few, speculation={
                   "method": "draft_model", "k": a.conf_k, "draft_model": a.draft,
                   "min_confidence": a.min_confidence}),
               "ngram": Engine.from_pretrained(a.target, max_batch=1, max_seq_len=cap, **few,
                                               speculation={"method": "ngram", "k": a.k}),
               "off": Engine.from_pretrained(a.target, max_batch=1, max_seq_len=cap, **few)}
    tok = engines["off"].tokenizer
    N = a.new_tokens
    gen = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)

    def hf(kind, ids):
        extra = {"assisted": {"assistant_model": hf_d}, "assisted k": {"assistant_model": hf_dk},
                 "lookup": {"prompt_lookup_num_tokens": a.k}}.get(kind, {})
        acc.reset()
        with torch.inference_mode():
            out = hf_t.generate(torch.tensor([ids]), **gen, **extra)
        st = CompletionStats(steps=acc.steps, draft_tokens=acc.drafted, accepted_tokens=acc.accepted) if extra \
            else None
        return out[0, len(ids):].tolist(), st

    def sm(kind, ids):
        c = engines[kind].generate([ids], SamplingParams(max_tokens=N, ignore_eos=True))[0]
        return c.token_ids, c.stats

    methods = {"transformers greedy": lambda ids: hf("greedy", ids),
               "transformers assisted": lambda ids: hf("assisted", ids),
               f"transformers assisted k={a.k}": lambda ids: hf("assisted k", ids),
               "transformers prompt lookup": lambda ids: hf("lookup", ids),
               "specmoe off": lambda ids: sm("off", ids),
               "specmoe draft_model": lambda ids: sm("draft_model", ids),
               f"specmoe draft_model k<={a.conf_k} conf {a.min_confidence}": lambda ids: sm("draft_model conf", ids),
               "specmoe ngram": lambda ids: sm("ngram", ids)}
    prompts = [tok.encode(p).ids for p in PROMPTS]
    times = {m: [] for m in methods}
    outs, stats = {}, {}
    for rep in range(a.reps + 1):                       # repetition 0 is a warm-up
        order = list(methods)[rep % len(methods):] + list(methods)[:rep % len(methods)]
        for m in order:
            t0 = time.perf_counter()
            res = [methods[m](ids) for ids in prompts]
            dt = time.perf_counter() - t0
            if rep:
                times[m].append(dt)
            outs[m] = [r[0] for r in res]
            stats[m] = [r[1] for r in res]
    same = all(outs[m] == outs["transformers greedy"] for m in methods)
    print(f"\nall outputs identical token for token: {same}\n")
    print("| method | tok/s median [min..max] | drafted | accepted | target steps |")
    print("|---|---:|---:|---:|---:|")
    total = N * len(prompts)
    tps = {}
    for m in methods:
        v = times[m]
        tps[m] = total / statistics.median(v)
        st = stats[m]
        cols = ("-", "-", "-") if st[0] is None else (sum(s.draft_tokens for s in st),
                                                      sum(s.accepted_tokens for s in st), sum(s.steps for s in st))
        print(f"| {m} | {tps[m]:.0f} [{total / max(v):.0f}..{total / min(v):.0f}] | {cols[0]} | {cols[1]} | {cols[2]} |")
    print()
    best = max(("transformers assisted", f"transformers assisted k={a.k}"), key=tps.get)
    ours_best = max(("specmoe draft_model", f"specmoe draft_model k<={a.conf_k} conf {a.min_confidence}"), key=tps.get)
    print(f"like for like: specmoe draft_model / transformers assisted k={a.k}: "
          f"{tps['specmoe draft_model'] / tps[f'transformers assisted k={a.k}']:.2f}x; "
          f"confidence-stopped / transformers assisted (defaults): "
          f"{tps[f'specmoe draft_model k<={a.conf_k} conf {a.min_confidence}'] / tps['transformers assisted']:.2f}x")
    for ours, theirs in ((ours_best, best), ("specmoe ngram", "transformers prompt lookup"),
                         ("specmoe off", "transformers greedy")):
        r = tps[ours] / tps[theirs]
        print(f"{ours} / {theirs}: {r:.2f}x" + ("" if "off" in ours else f" -> goal >= 2x {'MET' if r >= 2 else 'NOT MET'}"))
    if not same:
        sys.exit("outputs differ: the comparison is void")


if __name__ == "__main__":
    main()
