#!/usr/bin/env python
"""The bundled pair on held-out text: acceptance per drafter, routing locality,
sample completions. Held-out prompts come from the files scripts/train_tiny.py
held out (every 20th stdlib file); greedy, float32.

    .venv/bin/python scripts/eval_bundled.py [--prompts 16] [--new-tokens 48] [--k 4]

Acceptance length = committed tokens per target step (accepted + 1). Routing
locality: distinct experts per MoE layer for n tokens of ONE sequence (one
(n)-token verification chunk) against the last token of n DIFFERENT sequences
(one batched decode step), same contexts, against uniform routing E(1-(1-K/E)^n).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import corpus_files, read  # noqa: E402

from specmoe import Engine, SamplingParams  # noqa: E402
from specmoe.experts.batch import Chunk  # noqa: E402
from specmoe.experts.checkpoint import bundled_model  # noqa: E402


def held_out_prompts(tok, n: int, prompt_tokens: int) -> list[list[int]]:
    _, held, _ = corpus_files()
    out = []
    for p in held:
        ids = tok.encode(read(p)).ids
        for start in range(0, max(len(ids) - 2 * prompt_tokens, 0), 997):
            out.append(ids[start:start + prompt_tokens])
            if len(out) == n:
                return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    a = ap.parse_args()
    torch.manual_seed(0)
    print("command:", " ".join([sys.executable, *sys.argv]))
    moe, draft = bundled_model("tiny-moe"), bundled_model("tiny-draft")
    specs = {"draft_model": {"method": "draft_model", "k": a.k, "draft_model": str(draft)},
             "ngram": {"method": "ngram", "k": a.k},
             "layer_skip (first 1 of 4 layers)": {"method": "layer_skip", "k": a.k, "layers": 1},
             "layer_skip (first 2 of 4 layers)": {"method": "layer_skip", "k": a.k, "layers": 2}}
    off = Engine.from_pretrained(moe, max_batch=a.prompts, max_seq_len=512)
    prompts = held_out_prompts(off.tokenizer, a.prompts, a.prompt_tokens)
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    want = [o.token_ids for o in off.generate(prompts, params)]
    print(f"\n{len(prompts)} held-out prompts of {a.prompt_tokens} tokens, {a.new_tokens} new tokens, k = {a.k}\n")
    print("| drafter | acceptance (accepted / drafted) | acceptance length (tokens per target step) | same output as off |")
    print("|---|---:|---:|---|")
    for name, spec in specs.items():
        outs = Engine.from_pretrained(moe, max_batch=a.prompts, max_seq_len=512, speculation=spec).generate(
            prompts, params)
        dr, ac, steps = (sum(getattr(o.stats, f) for o in outs) for f in ("draft_tokens", "accepted_tokens", "steps"))
        toks = sum(len(o.token_ids) for o in outs)
        print(f"| {name} | {ac / max(dr, 1):.2f} ({ac}/{dr}) | {toks / steps:.2f} | "
              f"{[o.token_ids for o in outs] == want} |")

    # Routing locality on the same held-out contexts.
    r = off.runner
    E, K = r.config.moe.num_experts, r.config.moe.top_k
    print(f"\nRouting locality ({E} experts, top-{K}; distinct experts per MoE layer, mean over layers; "
          f"median over {len(prompts)} contexts / groups):\n")
    print("| n tokens | one sequence (n-token chunk) | n sequences (1 token each) | uniform routing |")
    print("|---:|---:|---:|---:|")
    for n in (2, 4, 8, 16):
        one, many = [], []
        for i, p in enumerate(prompts):
            seq = p + want[i]
            r.run([Chunk(0, 0, seq[:a.prompt_tokens])])
            one.append(r.run([Chunk(0, a.prompt_tokens, seq[a.prompt_tokens:a.prompt_tokens + n])],
                             routing=True).routing.mean_distinct)
        for g in range(len(prompts)):
            group = [(g + j) % len(prompts) for j in range(n)][:r.cache.num_slots]
            for s, i in enumerate(group):
                r.run([Chunk(s, 0, prompts[i])])
            many.append(r.run([Chunk(s, a.prompt_tokens, [want[i][0]]) for s, i in enumerate(group)],
                              routing=True).routing.mean_distinct)
        uniform = E * (1 - (1 - K / E) ** n)
        print(f"| {n} | {statistics.median(one):.2f} | {statistics.median(many):.2f} | {uniform:.2f} |")

    print("\nSample completions (greedy, speculation off):\n")
    tok = off.tokenizer
    for i in range(3):
        print("```python\n" + tok.decode(prompts[i][-40:]) + "\u2502" + tok.decode(want[i]) + "\n```\n")


if __name__ == "__main__":
    main()
