#!/usr/bin/env python
"""How well each kind of n-gram proposal is accepted on the bundled model.

Runs a fixed-k n-gram engine (greedy, batch 1) over the two prompts of
bench_vs_transformers.py and --held-out held-out stdlib prompts, records the
kind the drafter gave each proposal (drafter/ngram.py: n + max_n * f, n the
matched n-gram's length, f = 1 when the text followed its last proposal) and
what verification accepted, and prints per kind: steps, drafts, accepted,
the share of steps whose first draft was accepted, and accepted per step. No
timing: this is the evidence behind keeping acceptance apart per kind.

    .venv/bin/python scripts/ngram_kinds.py [--k 8] [--held-out 24] [--new-tokens 96]
"""

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_transformers import PROMPTS  # noqa: E402
from eval_bundled import held_out_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(ROOT / "experts/bundled/tiny-moe"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--held-out", type=int, default=24, help="held-out prompts of 64 tokens")
    ap.add_argument("--new-tokens", type=int, default=96)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from specmoe import Engine, SamplingParams
    eng = Engine.from_pretrained(a.target, max_batch=1, max_seq_len=1024,
                                 speculation={"method": "ngram", "k": a.k})
    last = [None]                   # the kind of the latest proposal (batch 1: the step's only one)
    propose = eng.proposer.propose

    def recording(inputs):
        out = propose(inputs)
        last[0] = out[0].kind
        return out

    eng.proposer.propose = recording
    tok = eng.tokenizer
    prompts = [tok.encode(p).ids for p in PROMPTS] + held_out_prompts(tok, a.held_out, 64)
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    rows = defaultdict(lambda: [0, 0, 0, 0])       # kind -> steps, drafted, accepted, first accepted
    max_n = eng.proposer.max_n
    for p in prompts:
        for c in eng.generate_stream([p], params):
            if c.draft_tokens:
                r = rows[last[0]]
                r[0] += 1
                r[1] += c.draft_tokens
                r[2] += c.accepted_tokens
                r[3] += c.accepted_tokens > 0
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"{len(prompts)} prompts, {a.new_tokens} new tokens each, greedy, batch 1, fixed k = {a.k}\n")
    print("| kind | match n | followed last proposal | steps | drafted | accepted | first draft accepted | accepted / step |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for kind in sorted(rows):
        s, d, acc, first = rows[kind]
        n, f = (kind - 1) % max_n + 1, kind > max_n
        print(f"| {kind} | {n} | {'yes' if f else 'no'} | {s} | {d} | {acc} | {first / s:.2f} | {acc / s:.2f} |")


if __name__ == "__main__":
    main()
