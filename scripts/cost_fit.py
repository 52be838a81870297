#!/usr/bin/env python
"""The controller's cost model against the steps it priced, by step shape.

Runs an "auto" engine on the bundled trained model (held-out prompts, greedy,
one torch thread), has the controller learn from every step (learn_budget 1)
and records, for each step the cost model observed, the price it gave that
step before it ran and the time it took. Prints per step shape (sequences,
tokens): steps, the median measured and predicted milliseconds and their
ratio; then the marginal price of a step's extra tokens over a 1-token step
at batch B, measured (medians of the run's own steps) against predicted (the
model at the end of the run). What the plan's choices rest on: a draft pays
when its expected tokens outweigh the step's extra time.

    .venv/bin/python scripts/cost_fit.py [--drafter ngram] [--batch 1] [--new-tokens 128] [--prompts 4]

With --synthetic ALPHA it runs moe-bench (scripts/make_moe_bench.py, built
under --out) on random prompts with the SYNTHETIC drafter of
bench_controller.py instead (the target's own greedy continuation accepted
with probability ALPHA per position): the benchmark grid's cells, priced.
"""

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_bundled import held_out_prompts  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="ngram", choices=("ngram", "draft_model", "layer_skip"))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts, run `--batch` at a time")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=8, help="k_max of the auto engine")
    ap.add_argument("--synthetic", type=float, default=None, metavar="ALPHA",
                    help="moe-bench with the synthetic drafter at this acceptance instead of the bundled model")
    ap.add_argument("--out", default=".cache", help="where moe-bench is built or found (--synthetic)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("command:", " ".join([sys.executable, *sys.argv]))
    from specmoe import Engine, SamplingParams
    from specmoe.experts.checkpoint import bundled_model
    from specmoe.router.cost_model import TARGET_FEATURES

    seq_len = a.prompt_len + a.new_tokens + a.k + 16
    if a.synthetic is None:
        spec = {"ngram": {"method": "ngram"},
                "draft_model": {"method": "draft_model", "draft_model": str(bundled_model("tiny-draft"))},
                "layer_skip": {"method": "layer_skip", "layers": 1}}[a.drafter]
        eng = Engine.from_pretrained(bundled_model("tiny-moe"), max_batch=a.batch, max_seq_len=seq_len,
                                     speculation={**spec, "k": a.k, "auto": True})
        prompts = held_out_prompts(eng.tokenizer, a.prompts, a.prompt_len)
    else:
        from make_moe_bench import build_checkpoint

        from specmoe.drafter import SyntheticProposer
        from specmoe.experts.runner import ModelRunner
        runner = ModelRunner.from_pretrained(build_checkpoint(Path(a.out) / "moe-bench", 0), max_seqs=a.batch,
                                             max_seq_len=seq_len)
        V = runner.config.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, V, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
        ref = Engine(runner).generate(prompts, SamplingParams(max_tokens=a.new_tokens, ignore_eos=True))
        conts = {tuple(p): o.token_ids for p, o in zip(prompts, ref)}
        eng = Engine(runner, proposer=SyntheticProposer(conts, a.synthetic, 1.0, vocab_size=V, seed=0),
                     speculation={"k": a.k, "auto": True})
    ctl = eng.controller
    ctl.learn_budget = 1.0              # learn from every step
    cost = ctl.cost
    rec = []                            # (seqs, tokens, measured s, predicted s) per observed step
    observe = cost.observe

    def recording(x, z, target_s, draft_s, predicted, x_plan=None):
        rec.append((int(x[1]), int(round(x[2] + x[6])), target_s + draft_s, predicted, int(z[2]), target_s,
                    predicted - float(cost.d @ z)))
        observe(x, z, target_s, draft_s, predicted, x_plan)

    cost.observe = recording
    params = SamplingParams(max_tokens=a.new_tokens, ignore_eos=True)
    for i in range(0, len(prompts), a.batch):
        eng.generate(prompts[i:i + a.batch], params)
    print(f"\n{len(rec)} steps observed; cost model MAPE {cost.mape:.3f}, knee {cost.knee:.0f}, locality exponent "
          f"{cost.experts.beta:.2f}; coefficients (us): "
          + ", ".join(f"{n}={v * 1e6:.2f}" for n, v in zip(TARGET_FEATURES, cost.c)))
    st = ctl.stats()
    print(f"draft lengths chosen {dict(sorted(st['controller_k_histogram'].items()))}, probes "
          f"{st['controller_probes']}, off probes {st.get('controller_off_probes')}")
    by = defaultdict(list)
    for s, n, t, p, d, tt, tp in rec:
        by[(s, n, d > 0)].append((t, p, tt, tp))
    print("\nPer step shape, as priced before the step; the target's part apart (the step without the "
          "drafter):")
    print("\n| seqs | tokens | drafted | steps | measured ms | predicted ms | predicted / measured "
          "| target measured ms | target predicted ms |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for (s, n, d), v in sorted(by.items()):
        t, p, tt, tp = (statistics.median(x[i] for x in v) * 1e3 for i in range(4))
        print(f"| {s} | {n} | {'yes' if d else 'no'} | {len(v)} | {t:.3f} | {p:.3f} | {p / t:.2f} | {tt:.3f} "
              f"| {tp:.3f} |")
    # The marginal price of extra tokens at batch B: the run's own steps against the final model.
    B = a.batch
    base = [t for s, n, t, _, d, *_ in rec if s == B and n == B]
    if base:
        t1 = statistics.median(base)
        ctx = [a.prompt_len + a.new_tokens // 2] * B
        x1 = cost.target_features([1] * B, ctx)
        p1 = cost.predict(x1, cost.draft_features([0] * B))
        print(f"\nextra time over a {B}-token decode step ({t1 * 1e3:.3f} ms measured, {p1 * 1e3:.3f} ms by the "
              "final model), target and drafter, uniform depth k:")
        print("\n| k | steps | measured extra ms | predicted extra ms | predicted / measured |")
        print("|---:|---:|---:|---:|---:|")
        for k in range(1, a.k + 1):
            v = [t for s, n, t, _, d, *_ in rec if s == B and n == B * (k + 1) and d == B * k]
            if not v:
                continue
            xk = cost.target_features([k + 1] * B, ctx)
            pk = cost.predict(xk, cost.draft_features([k] * B))
            m = statistics.median(v) - t1
            print(f"| {k} | {len(v)} | {m * 1e3:.3f} | {(pk - p1) * 1e3:.3f} | "
                  f"{(pk - p1) / m if m > 0 else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
