"""Speculation "auto" (the controller) against no speculation and every fixed k.

    .venv/bin/python scripts/bench_controller.py --out .cache --batch 1,4 --alpha 0.5,0.9 \\
        --model moe-bench --ep 1 --json out.json

Every cell (model, ep, batch, alpha, decay) runs the policies "off", "auto"
and "k=1".."k=8" on the same prompts through the real engine (scheduler,
verification, the controller's plan), interleaved step by step: in every
repetition all policies' engines hold the cell's requests at once and advance
one step each in turn (scripts/lockstep.py), each timed by the sum of its own
steps, so this VM's drift from one second to the next reaches every policy
alike; a cell's figure is the median over repetitions. `--interleave run`
runs each policy's whole generation in turn instead (the order rotated by
repetition, wall clock), as before 2026-12-02 and always under EP. Each
policy's engine first runs the cell's prompts once untimed (warm-up; for
"auto" this is also where it learns the acceptance rate).

The drafter is SYNTHETIC (drafter/synthetic.py, benchmarks only): it proposes
the target's own greedy continuation (recorded beforehand) with probability
alpha * decay**j at draft position j and a wrong token otherwise, so
verification runs the real path and acceptance is set, not trained. It costs
no time, which favours deep drafts; the real-drafter section (--real) uses the
bundled model with n-gram, draft-model and layer-skip drafting.

The mixed trace (--trace) runs phases of changing batch and alpha back to back
on one engine per policy; its figure is total committed tokens / total time.
The heterogeneous trace (--trace-kind hetero) does the same with requests of
two kinds in one batch, alternating: alpha 0.9 (copy-like) and 0.2 (free
text), concurrency changing over time; a single fixed k then drafts as deep
for both kinds, where a per-request k need not.

`--auto-variant NAME=VALUE[,NAME=VALUE]` (repeatable) adds a policy
"auto[NAME=VALUE]": auto with those controller settings (attributes of
router/controller.py's Controller, e.g. margin=0.03, explore=0.0,
dither_every=8, or of its acceptance estimator as acceptance.NAME, e.g.
acceptance.change_h=8), in the same interleaved run as everything else, so a knob's
A/B shares the machine's drift; in grid cells its figures are a table of their
own and JSON rows of that policy; in the traces (--trace) it is a row of the
trace's table; with the real drafters (--real) a table of their own again.

`--step-log FILE` keeps each policy's steps of a cell's (a trace's, a real
drafter cell's) last repetition, one JSON line a step (requests, sampled,
draft lengths, accepted, committed, own-clock ms and the engine's split of
it; for auto also the goodput it prices with, the cost model's price of a
next step at uniform k and the acceptance it reads), and prints them grouped
by how many requests a step sampled: where a policy gains or loses, e.g. in
a batch's tail of a few requests, or where the price of a depth is off.

Output: a markdown table per section on stdout, --json (rows {"model", "ep",
"batch", "alpha", "decay", "policy", "tokens_per_s", "tpot_ms", "mean_k"}; grid
rows also "tokens_per_s_reps", every repetition's figure; a trace's rows are
per phase and policy, {"model", "ep", "trace", "phase", "batch", "alpha",
"policy", "tokens_per_s"}, the medians its per-phase table prints), --png (heatmap of
the best fixed k per cell next to auto's mean k; needs matplotlib). Timings
on a shared machine are noisy: compare ratios inside a run.
"""

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import cpu_model, loadavg  # noqa: E402
from bench_spec import git_revision, rotate  # noqa: E402
from lockstep import Clock, lockstep, own_runner, step_summary  # noqa: E402
from make_moe_bench import build_checkpoint, build_dense_checkpoint  # noqa: E402

KS = list(range(1, 9))


def policies(ks, variants=()):
    return ["off", "auto"] + [f"auto[{v}]" for v in variants] + [f"k={k}" for k in ks]


def variant_settings(policy: str) -> dict:
    """The controller settings of a policy "auto[name=value,...]" ({} for "auto")."""
    if policy == "auto":
        return {}
    out = {}
    for item in policy[len("auto["):-1].split(","):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = int(value)
        except ValueError:
            out[name.strip()] = float(value)
    return out


# Controller settings a variant may not change: sized or used at construction (k_max sizes the acceptance
# estimator and the cost model; the profile runs in __init__; reuse_weight and log are consumed there).
FIXED_AT_START = {"runner", "proposer", "k_max", "profile", "profile_budget_s", "reuse_weight", "log",
                  "acceptance"}     # the estimator's settings are variants as acceptance.NAME


def variant_knobs() -> set:
    """The Controller settings an auto variant may set, and its acceptance estimator's as "acceptance.NAME"."""
    import inspect
    from specmoe.router.acceptance import AcceptanceEstimator
    from specmoe.router.controller import Controller
    est = set(inspect.signature(AcceptanceEstimator.__init__).parameters) - {"self", "k_max"}
    return (set(inspect.signature(Controller.__init__).parameters) - FIXED_AT_START - {"self"}) | {
        "acceptance." + n for n in est}


def make_engine(runner, policy, proposer_factory=None, profiled=None, spec=None):
    """The engine of a policy, drafting with proposer_factory() (the synthetic drafter) or else with the
    drafter the speculation config `spec` names (the real ones). profiled: an "auto" engine whose start-up
    profile a variant takes over (a copy of its cost model before any step),
    so that an A/B differs by the knob, not by two profiles of a noisy
    machine (on moe-bench four profiles priced the same step increment at
    0.85-2.18x of its time, docs/BENCHMARKS.md "Session 12")."""
    from specmoe import Engine

    def build(**speculation):
        if proposer_factory is None:
            return Engine(runner, speculation={**(spec or {}), **speculation})
        return Engine(runner, proposer=proposer_factory(), speculation=speculation)
    if policy == "off":
        return Engine(runner)
    if policy.startswith("auto"):
        if profiled is not None and policy != "auto":
            # No profile of its own (about 5 s a variant a cell): the engine's controller is unprofiled and
            # prices with a copy of auto's cost model (the engine reads `controller is not None` as auto).
            from specmoe.router.controller import Controller
            eng = build(k=max(KS))
            eng.controller = Controller(runner, eng.proposer, k_max=max(KS), profile=False)
            eng.controller.cost = copy.deepcopy(profiled.controller.cost)
        else:
            eng = build(k=max(KS), auto=True)
        for name, value in variant_settings(policy).items():    # before any step: the controller's knobs
            owner, _, attr = name.rpartition(".")
            obj = getattr(eng.controller, owner) if owner else eng.controller
            if not hasattr(obj, attr):
                raise SystemExit(f"--auto-variant: the controller has no setting {name!r}")
            setattr(obj, attr, value)
        return eng
    return build(k=int(policy[2:]))


def timed_generate(eng, prompts, params):
    """(committed tokens/s, median TPOT ms over requests, mean k per request-step, {k: request-steps}) of one
    generate call, by the wall clock."""
    clock = Clock(eng)
    t0 = time.perf_counter()
    for chunk in eng.generate_stream(prompts, params):
        if chunk.token_ids:
            clock.record(chunk.index, len(chunk.token_ids), time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return clock.tokens / wall, clock.tpot_ms(), clock.mean_k(), clock.k_histogram()


def interleaved(engines, prompts, params, reps, step=True, steps_out=None):
    """Each engine runs the prompts once untimed (warm-up; "auto" learns there),
    then `reps` timed times: {policy: [samples]}. step: all engines at once, one
    step each in turn (scripts/lockstep.py; each engine owns its runner), each
    timed by its own steps; else each engine's whole run in turn, the order
    rotated by repetition, timed by the wall clock. steps_out (a dict, step
    only): filled with {policy: the last repetition's step records}."""
    if step:
        phases = [(prompts, params, None)]
        lockstep(engines, phases)
        samples = {p: [] for p in engines}
        for r in range(reps):
            keep = steps_out is not None and r == reps - 1
            for p, c in lockstep(engines, phases, start=r, keep_steps=keep).items():
                samples[p].append((c.tokens / c.seconds, c.tpot_ms(), c.mean_k(), c.k_histogram()))
                if keep:
                    steps_out[p] = c.steps
        return samples
    for eng in engines.values():
        timed_generate(eng, prompts, params)
    samples = {p: [] for p in engines}
    for r in range(reps):
        for p in rotate(list(engines), r):
            samples[p].append(timed_generate(engines[p], prompts, params))
    return samples


def runner_for(runner, step):
    """The runner a policy's engine gets: its own over the same weights when
    the engines step at once (they all hold requests), else the shared one."""
    return own_runner(runner) if step else runner


def run_cell(runner, prompts, conts, batch, alpha, decay, ks, reps, new_tokens, seed, V, step=True, variants=(),
             steps_out=None):
    from specmoe import SamplingParams
    from specmoe.drafter import SyntheticProposer
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

    def factory():
        return SyntheticProposer(conts, alpha, decay, vocab_size=V, seed=seed)
    engines = {}
    for p in policies(ks, variants):            # "auto" before its variants, which take over its profile
        engines[p] = make_engine(runner_for(runner, step), p, factory, engines.get("auto"))
    samples = interleaved(engines, prompts, params, reps, step, steps_out)
    out = {}
    for p, xs in samples.items():
        out[p] = {"tokens_per_s": statistics.median(x[0] for x in xs), "tpot_ms": statistics.median(x[1] for x in xs),
                  "mean_k": statistics.mean(x[2] for x in xs), "reps": [round(x[0], 2) for x in xs],
                  "k_hist": dict(sum((Counter(x[3]) for x in xs), Counter()))}
        if p.startswith("auto"):
            st = engines[p].stats()
            out[p]["mape"] = st["cost_model_mape"]
            out[p]["overhead"] = st["controller_overhead"]
            out[p]["events"] = {e: st[f"controller_{e}"]
                                for e in ("probes", "off_probes", "draft_probes", "cooldowns")}
    for e in engines.values():
        e.close()
    return out


# Phases (batch, alpha), or (batch, (alpha per request, cycled over the batch's requests)).
TRACES = {"mixed": ((1, 0.9), (16, 0.3), (4, 0.7), (64, 0.5), (2, 0.2), (8, 0.9)),
          "hetero": ((1, 0.9), (4, (0.9, 0.2)), (16, (0.9, 0.2)), (1, 0.2), (8, (0.9, 0.2)), (2, (0.9, 0.2)))}


def run_trace(runner, prompt_pool, conts, phases, ks, reps, new_tokens, seed, V, log, step=True, variants=(),
              steps_out=None):
    """Phases [(batch, alpha or alphas)] back to back on one engine per policy (auto variants included, each
    pricing with a copy of auto's profile). steps_out (a dict, step only): filled with {policy: the last
    repetition's step records}."""
    from specmoe import SamplingParams
    from specmoe.drafter import SyntheticProposer
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    engines, props = {}, {}
    for p in policies(ks, variants):
        prop = SyntheticProposer(conts, 0.0, vocab_size=V, seed=seed) if p != "off" else None
        props[p] = prop
        engines[p] = make_engine(runner_for(runner, step), p, lambda prop=prop: prop, engines.get("auto"))

    def set_alpha(p, alpha, batch):
        if props[p] is not None:
            rates = alpha if isinstance(alpha, tuple) else (alpha,)
            props[p].set_alpha(rates[0], {tuple(q): rates[j % len(rates)] for j, q in enumerate(prompt_pool[:batch])})

    samples = {p: [] for p in engines}
    phase_s = {p: [[] for _ in phases] for p in engines}
    phase_tokens = [0] * len(phases)
    for r in range(reps + 1):                 # repetition 0 is the warm-up
        if step:
            jobs = {p: [(prompt_pool[:b], params, lambda p=p, a=a, b=b: set_alpha(p, a, b)) for b, a in phases]
                    for p in engines}
            keep = steps_out is not None and r == reps
            for p, c in lockstep(engines, jobs, start=r, keep_steps=keep).items():
                if keep:
                    steps_out[p] = c.steps
                phase_tokens[:] = c.phase_tokens
                if r:
                    samples[p].append(c.tokens / c.seconds)
                    for i, dt in enumerate(c.phase_s):
                        phase_s[p][i].append(dt)
            log(f"trace repetition {r} done")
            continue
        for p in rotate(list(engines), r):
            tokens, wall = 0, 0.0
            for i, (batch, alpha) in enumerate(phases):
                set_alpha(p, alpha, batch)
                t0 = time.perf_counter()
                outs = engines[p].generate(prompt_pool[:batch], params)
                dt = time.perf_counter() - t0
                wall += dt
                n = sum(len(o.token_ids) for o in outs)
                tokens += n
                phase_tokens[i] = n
                if r:
                    phase_s[p][i].append(dt)
            if r:
                samples[p].append(tokens / wall)
        log(f"trace repetition {r} done")
    out = {p: statistics.median(xs) for p, xs in samples.items()}
    # The bound no single-k policy reaches and a per-phase one could: each phase at its fastest policy
    # (medians per phase; "auto" left out), i.e. an oracle that knows the phase and the best k for it.
    med_all = {p: [statistics.median(ts) for ts in phase_s[p]] for p in engines}
    med = {p: m for p, m in med_all.items() if not p.startswith("auto")}
    best_phase = [min(med, key=lambda p: med[p][i]) for i in range(len(phases))]
    oracle = sum(phase_tokens) / sum(med[p][i] for i, p in enumerate(best_phase))
    per_phase = {p: [n / t for n, t in zip(phase_tokens, m)] for p, m in med_all.items()}
    return out, oracle, best_phase, per_phase


def print_phases(phases, per_phase, best_phase) -> None:
    """Each phase's committed tokens/s (medians of its repetitions): off, the phase's fastest fixed policy,
    auto and its variants."""
    autos = [p for p in per_phase if p.startswith("auto")]
    print("\n| phase (batch, alpha) | off | fastest fixed | " + " | ".join(autos) + " | auto / fastest | auto / off |")
    print("|---|---:|---:|" + "---:|" * len(autos) + "---:|---:|")
    for i, (b, a) in enumerate(phases):
        bp = best_phase[i]
        cells = " | ".join(f"{per_phase[p][i]:.1f}" for p in autos)
        print(f"| {i}: ({b}, {a}) | {per_phase['off'][i]:.1f} | {per_phase[bp][i]:.1f} ({bp}) | {cells} | "
              f"{per_phase['auto'][i] / per_phase[bp][i]:.2f}x | {per_phase['auto'][i] / per_phase['off'][i]:.2f}x |")


def trace_rows(model, ep, kind, phases, per_phase) -> list:
    """A trace's JSON rows, one a policy and phase: per_phase's median tokens/s; a hetero phase's alphas a list."""
    return [{"model": model, "ep": ep, "trace": kind, "phase": i, "batch": b,
             "alpha": list(a) if isinstance(a, tuple) else a, "policy": p, "tokens_per_s": v[i]}
            for p, v in per_phase.items() for i, (b, a) in enumerate(phases)]


def tokens_for(args, batch: int) -> int:
    return max(args.new_tokens, -(-args.min_tokens // batch))


def run_real(args, log):
    """The bundled trained pair with the real drafters, on held-out prompts."""
    from eval_bundled import held_out_prompts

    from specmoe import Engine, SamplingParams
    from specmoe.experts.checkpoint import bundled_model
    from specmoe.experts.runner import ModelRunner
    moe, draft = bundled_model("tiny-moe"), bundled_model("tiny-draft")
    max_b = max(args.batch_list)
    seq_len = args.prompt_len + tokens_for(args, min(args.batch_list)) + 16
    tok = Engine.from_pretrained(moe, max_batch=1, max_seq_len=64).tokenizer
    pool = held_out_prompts(tok, max(max_b, args.real_prompts), args.prompt_len)
    drafters = {"ngram": {"method": "ngram"}, "draft_model": {"method": "draft_model", "draft_model": str(draft)},
                "layer_skip": {"method": "layer_skip", "layers": 1}}
    unknown = set(args.drafters.split(",")) - set(drafters)
    if unknown:
        raise SystemExit(f"--drafters: unknown {sorted(unknown)}; choose from {sorted(drafters)}")
    drafters = {n: d for n, d in drafters.items() if n in args.drafters.split(",")}
    rows, table, vtable = [], [], []
    step = args.interleave == "step"
    for name, spec in drafters.items():
        for batch in args.batch_list:
            # `batch` requests at a time (the runner's slots), over --real-prompts prompts (at least `batch`):
            # a batch-1 cell of one prompt measures that prompt's text, not the drafter's
            base = ModelRunner.from_pretrained(moe, max_seqs=batch, max_seq_len=seq_len)
            prompts = pool[:max(batch, args.real_prompts)]
            params = SamplingParams(max_tokens=tokens_for(args, len(prompts)), ignore_eos=True)
            engines = {}
            for p in policies(args.ks_list, args.auto_variant):    # "auto" before its variants (its profile)
                engines[p] = make_engine(runner_for(base, step), p, None, engines.get("auto"), spec)
            steps_out = {} if args.step_fh and step else None
            samples = interleaved(engines, prompts, params, args.reps, step, steps_out)
            for e in engines.values():
                e.close()
            res = {p: statistics.median(x[0] for x in xs) for p, xs in samples.items()}
            mean_k = statistics.mean(x[2] for x in samples["auto"])
            if steps_out:
                write_step_log(args.step_fh, {"section": "real", "drafter": name, "batch": batch}, steps_out, res)
            for p, xs in samples.items():
                rows.append({"model": "tiny-moe (bundled)", "drafter": name, "ep": 1, "batch": batch, "alpha": None,
                             "decay": None, "policy": p, "tokens_per_s": res[p],
                             "tpot_ms": statistics.median(x[1] for x in xs),
                             "mean_k": statistics.mean(x[2] for x in xs)})
            best_p = max((p for p in res if p.startswith("k=")), key=res.get)
            table.append((name, batch, res["off"], best_p, res[best_p], res["auto"], mean_k))
            for v in args.auto_variant:
                vtable.append((name, batch, v, res["auto"], res[f"auto[{v}]"], res[best_p],
                               statistics.mean(x[2] for x in samples[f"auto[{v}]"])))
            log(f"real {name} batch={batch}: off {res['off']:.0f}, best {best_p} {res[best_p]:.0f}, "
                f"auto {res['auto']:.0f} (mean k {mean_k:.2f})"
                + "".join(f"; auto[{v}] {res[f'auto[{v}]']:.0f}" for v in args.auto_variant))
    print("\n## Real drafters: bundled tiny-moe, held-out prompts, committed tokens/s\n")
    print("| drafter | batch | off | best fixed k | auto | auto mean k | auto / best | auto / off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, b, off, bp, best, auto, mk in table:
        print(f"| {name} | {b} | {off:.0f} | {best:.0f} ({bp}) | {auto:.0f} | {mk:.2f} | {auto / best:.2f}x | "
              f"{auto / off:.2f}x |")
    if vtable:
        print("\n## Real drafters: auto variants (the same interleaved runs)\n")
        print("| drafter | batch | variant | auto | variant | variant / auto | variant / best fixed k | "
              "variant mean k |")
        print("|---|---:|---|---:|---:|---:|---:|---:|")
        for name, b, v, auto, tv, best, mv in vtable:
            print(f"| {name} | {b} | {v} | {auto:.0f} | {tv:.0f} | {tv / auto:.2f}x | {tv / best:.2f}x | {mv:.2f} |")
    return rows


def k_shares(hist: dict) -> str:
    """{k: request-steps} as 'k:share%' for the timed repetitions."""
    n = sum(hist.values())
    return " ".join(f"{k}:{100 * v / n:.0f}%" for k, v in sorted(hist.items())) if n else "-"


def write_step_log(fh, key: dict, steps_out: dict, res: dict) -> None:
    """--step-log: every policy's step records of the last repetition as JSON lines under `key`, and on
    stdout, for "off", the fastest fixed k and every auto policy, the steps grouped by how many requests they
    sampled (where in a batch's life a policy gains or loses: its full stretch or its tail)."""
    for p, steps in steps_out.items():
        for st in steps:
            fh.write(json.dumps({**key, "policy": p, **st}) + "\n")
    fh.flush()
    best_p = max((p for p in res if p.startswith("k=")), key=res.get)
    print(f"\n### Steps of the last repetition by requests sampled: {key}\n")
    print("| policy | requests sampled | steps | ms a step | committed tokens/s | mean k |")
    print("|---|---:|---:|---:|---:|---:|")
    for p in ["off", best_p] + [p for p in steps_out if p.startswith("auto")]:
        for label, n, ms, tps, mk in step_summary(steps_out[p]):
            print(f"| {p} | {label} | {n} | {ms:.2f} | {tps:.0f} | {mk:.2f} |")


def fmt_cell(res, ks):
    off = res["off"]["tokens_per_s"]
    best_k = max(ks, key=lambda k: res[f"k={k}"]["tokens_per_s"])
    best = res[f"k={best_k}"]["tokens_per_s"]
    auto = res["auto"]["tokens_per_s"]
    return off, best_k, best, auto


def grid_rows(rows) -> list:
    """The rows the heatmap draws: the synthetic grid's, not a trace's nor the real drafters' (alpha None)."""
    return [r for r in rows if r["alpha"] is not None and "trace" not in r]


def heatmap(rows, path, ks):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--png {path}: matplotlib is not installed (pip install matplotlib); no plot written")
        return
    cells = sorted({(r["model"], r["ep"], r["decay"], r["batch"], r["alpha"]) for r in rows})
    panels = sorted({(m, ep, d) for m, ep, d, _, _ in cells})
    fig, axes = plt.subplots(len(panels), 2, figsize=(9, 3.2 * len(panels)), squeeze=False)
    for row, (m, ep, d) in enumerate(panels):
        batches = sorted({b for mm, e, dd, b, _ in cells if (mm, e, dd) == (m, ep, d)})
        alphas = sorted({a for mm, e, dd, _, a in cells if (mm, e, dd) == (m, ep, d)})
        best = torch.full((len(batches), len(alphas)), float("nan"))
        auto = torch.full_like(best, float("nan"))
        for r in rows:
            if (r["model"], r["ep"], r["decay"]) != (m, ep, d):
                continue
            i, j = batches.index(r["batch"]), alphas.index(r["alpha"])
            if r["policy"] == "auto":
                auto[i, j] = r["mean_k"]
        for i, b in enumerate(batches):
            for j, a in enumerate(alphas):
                cell = [r for r in rows if (r["model"], r["ep"], r["decay"], r["batch"], r["alpha"]) == (m, ep, d, b, a)]
                fixed = [(r["tokens_per_s"], int(r["policy"][2:])) for r in cell if r["policy"].startswith("k=")]
                off = next(r["tokens_per_s"] for r in cell if r["policy"] == "off")
                bt, bk = max(fixed)
                best[i, j] = bk if bt > off else 0
        for col, (data, title) in enumerate(((best, "best fixed k (0: off)"), (auto, "auto: mean k chosen"))):
            ax = axes[row][col]
            im = ax.imshow(data.numpy(), vmin=0, vmax=max(ks), cmap="viridis", origin="lower", aspect="auto")
            ax.set_xticks(range(len(alphas)), [str(a) for a in alphas])
            ax.set_yticks(range(len(batches)), [str(b) for b in batches])
            ax.set_xlabel("alpha")
            ax.set_ylabel("batch")
            ax.set_title(f"{m} ep={ep} decay={d}: {title}", fontsize=9)
            for i in range(len(batches)):
                for j in range(len(alphas)):
                    v = data[i, j].item()
                    if v == v:
                        ax.text(j, i, f"{v:.1f}" if col else f"{int(v)}", ha="center", va="center", color="w",
                                fontsize=8)
            fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"heatmap written to {path}")


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="moe-bench,dense-bench", help="moe-bench and/or dense-bench")
    ap.add_argument("--batch", default="1,2,4,8,16,32,64")
    ap.add_argument("--alpha", default="0.3,0.5,0.7,0.9")
    ap.add_argument("--decay", default="1.0,0.8", help="acceptance decay per draft position (1.0: flat)")
    ap.add_argument("--ep", default="1", help="expert-parallel degrees (ep > 1 needs the EP runner)")
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8", help="fixed k policies compared (auto may use up to 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=256,
                    help="each run commits at least this many tokens in all: small batches generate "
                         "ceil(min_tokens / batch) per request, so the synthetic coin flips average out")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--trace", action="store_true", help="also run the mixed trace")
    ap.add_argument("--trace-only", action="store_true", help="run only the mixed trace")
    ap.add_argument("--trace-kind", default="mixed", help="which traces: mixed and/or hetero (see TRACES)")
    ap.add_argument("--real", action="store_true",
                    help="also run the bundled trained model with the real drafters (ngram, draft_model, layer_skip)")
    ap.add_argument("--real-only", action="store_true", help="run only the real-drafter section")
    ap.add_argument("--drafters", default="ngram,draft_model,layer_skip",
                    help="the real-drafter section's drafters (ngram, draft_model, layer_skip)")
    ap.add_argument("--real-prompts", type=int, default=0,
                    help="the real-drafter section's prompts per cell, `batch` at a time (default: `batch`)")
    ap.add_argument("--interleave", default="step", choices=("step", "run"),
                    help="step: every policy's engine holds its requests at once and they step in turn, each "
                         "timed by its own steps (the VM's drift reaches all alike); run: each policy's whole run "
                         "in turn, wall clock (the EP runner always: its workers are not copied per policy)")
    ap.add_argument("--auto-variant", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also run auto with these controller settings, as policy auto[NAME=VALUE], in the same "
                         "interleaved run (an A/B of a knob, e.g. margin=0.03); repeatable; grid cells, traces and "
                         "the real drafters")
    ap.add_argument("--step-log", default=None, metavar="FILE",
                    help="write every policy's steps of each cell's (and trace's) last repetition as JSON lines "
                         "to FILE, and print them grouped by requests sampled (needs --interleave step)")
    ap.add_argument("--out", default=".cache", help="where the bench checkpoints are built or found")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    a.models = [m.strip() for m in a.model.split(",") if m.strip()]
    bad = [m for m in a.models if m not in ("moe-bench", "dense-bench")]
    if bad:
        ap.error(f"--model {bad[0]!r}: expected moe-bench or dense-bench")
    for name in ("batch", "ep", "ks"):
        setattr(a, name + "_list", [int(x) for x in getattr(a, name).split(",") if x])
    bad = [t for t in a.trace_kind.split(",") if t not in TRACES]
    if bad:
        ap.error(f"--trace-kind {bad[0]!r}: expected one of {', '.join(TRACES)}")
    knobs = variant_knobs() if a.auto_variant else set()
    for v in a.auto_variant:
        try:
            settings = variant_settings(f"auto[{v}]")
        except ValueError:
            ap.error(f"--auto-variant {v!r}: expected NAME=NUMBER[,NAME=NUMBER]")
        bad = sorted(set(settings) - knobs)
        if bad:
            ap.error(f"--auto-variant {v!r}: {bad[0]!r} is not a controller setting a variant can change "
                     f"(one of {', '.join(sorted(knobs))})")
    if a.step_log and a.interleave != "step":
        ap.error("--step-log needs --interleave step (the records are of each engine's own steps)")
    if len(set(a.auto_variant)) != len(a.auto_variant):
        ap.error("--auto-variant: the same variant given twice")
    a.alpha_list = [float(x) for x in a.alpha.split(",") if x]
    a.decay_list = [float(x) for x in a.decay.split(",") if x]
    if any(not 0 <= x <= 1 for x in a.alpha_list + a.decay_list):
        ap.error("alpha and decay must be in [0, 1]")
    if any(not 1 <= k <= 8 for k in a.ks_list):
        ap.error("--ks must be in 1..8")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    t_run = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_run:5.0f} s] {msg}", file=sys.stderr, flush=True)
    print("# specmoe speculation controller benchmark ("
          + ("real drafters on the bundled model" if args.real_only else
             "SYNTHETIC drafter" + ("; real drafters in their own section" if args.real else "")) + ")\n")
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"machine: {cpu_model()}, torch threads 1, device cpu, float32; commit {git_revision()}; "
          f"load average at start {loadavg()}")
    print(f"settings: prompt {args.prompt_len} tokens, max({args.new_tokens}, ceil({args.min_tokens} / batch)) new "
          f"tokens per request, {args.reps} interleaved reps after one warm-up run per policy"
          + (f"; real drafters: {args.real_prompts} prompts per cell, `batch` at a time" if args.real_prompts else "")
          + "\n")
    from specmoe.experts.runner import ModelRunner
    root = Path(args.out)
    builders = {"moe-bench": build_checkpoint, "dense-bench": build_dense_checkpoint}
    rows, summary, variants = [], [], []
    max_b = max(args.batch_list)
    args.step_fh = open(args.step_log, "w") if args.step_log else None
    for model in ([] if args.real_only else args.models):
        path = builders[model](root / model, args.seed)
        for ep in args.ep_list:
            seq_len = args.prompt_len + tokens_for(args, min(args.batch_list)) + 16
            if ep == 1:
                runner = ModelRunner.from_pretrained(path, max_seqs=max_b, max_seq_len=seq_len)
            else:
                from specmoe.experts.ep_runner import EPRunner
                runner = EPRunner.from_pretrained(path, ep=ep, max_seqs=max_b, max_seq_len=seq_len)
            step = args.interleave == "step" and own_runner(runner) is not None
            if args.step_fh and not step:
                log(f"--step-log: {model} ep={ep} runs whole runs in turn (its workers are not copied per policy): "
                    f"no step records")
            V = runner.config.vocab_size
            g = torch.Generator().manual_seed(args.seed)
            pool = [torch.randint(0, V, (args.prompt_len,), generator=g).tolist() for _ in range(max_b)]
            from specmoe import Engine, SamplingParams
            ref = Engine(runner).generate(pool, SamplingParams(max_tokens=tokens_for(args, min(args.batch_list)),
                                                               ignore_eos=True))
            conts = {tuple(p): o.token_ids for p, o in zip(pool, ref)}
            if not args.trace_only:
                for decay in args.decay_list:
                    for batch in args.batch_list:
                        for alpha in args.alpha_list:
                            steps_out = {} if args.step_fh and step else None
                            res = run_cell(runner, pool[:batch], conts, batch, alpha, decay, args.ks_list,
                                           args.reps, tokens_for(args, batch), args.seed, V, step, args.auto_variant,
                                           steps_out)
                            if steps_out:
                                write_step_log(args.step_fh, {"section": "grid", "model": model, "ep": ep,
                                                              "batch": batch, "alpha": alpha, "decay": decay},
                                               steps_out, {p: r["tokens_per_s"] for p, r in res.items()})
                            for p, r in res.items():
                                rows.append({"model": model, "ep": ep, "batch": batch, "alpha": alpha,
                                             "decay": decay, "policy": p, "tokens_per_s": r["tokens_per_s"],
                                             "tpot_ms": r["tpot_ms"], "mean_k": r["mean_k"],
                                             "tokens_per_s_reps": r["reps"], "k_hist": r["k_hist"]})
                            off, bk, best, auto = fmt_cell(res, args.ks_list)
                            summary.append((model, ep, decay, batch, alpha, off, bk, best, auto,
                                            res["auto"]["mean_k"], res["auto"]["mape"], res["auto"]["overhead"]))
                            log(f"{model} ep={ep} decay={decay} batch={batch} alpha={alpha}: off {off:.0f}, "
                                f"best k={bk} {best:.0f}, auto {auto:.0f} ({auto / best:.2f}x best, "
                                f"{auto / off:.2f}x off); auto's k per request-step {k_shares(res['auto']['k_hist'])}, "
                                f"since its start {res['auto']['events']}")
                            for v in args.auto_variant:
                                r = res[f"auto[{v}]"]
                                variants.append((model, ep, decay, batch, alpha, v, auto, r["tokens_per_s"],
                                                 best, res["auto"]["mean_k"], r["mean_k"]))
            for kind in (args.trace_kind.split(",") if args.trace or args.trace_only else []):
                phases = [(b, a) for b, a in TRACES[kind] if b <= max_b]     # --batch's largest caps the phases
                steps_out = {} if args.step_fh and step else None
                res, oracle, best_phase, per_phase = run_trace(runner, pool, conts, phases, args.ks_list,
                                                               args.reps, args.new_tokens, args.seed, V, log, step,
                                                               args.auto_variant, steps_out)
                if steps_out:
                    write_step_log(args.step_fh, {"section": f"trace {kind}", "model": model, "ep": ep},
                                   steps_out, res)
                best_p = max((p for p in res if p.startswith("k=")), key=res.get)
                print(f"\n## {kind.capitalize()} trace: {model}, ep {ep}, phases (batch, alpha or alphas cycled over "
                      f"the requests) {phases}\n")
                print("| policy | tokens/s | vs off | vs best fixed |")
                print("|---|---:|---:|---:|")
                for p, v in res.items():
                    print(f"| {p} | {v:.1f} | {v / res['off']:.2f}x | {v / res[best_p]:.2f}x |")
                print(f"| per-phase oracle ({', '.join(best_phase)}) | {oracle:.1f} | {oracle / res['off']:.2f}x | "
                      f"{oracle / res[best_p]:.2f}x |")
                print(f"\nauto / best single fixed k ({best_p}): {res['auto'] / res[best_p]:.3f}x; "
                      f"the per-phase oracle (each phase at its fastest fixed policy) / best single: "
                      f"{oracle / res[best_p]:.3f}x; auto / oracle: {res['auto'] / oracle:.3f}x")
                print_phases(phases, per_phase, best_phase)
                rows += trace_rows(model, ep, kind, phases, per_phase)
            if hasattr(runner, "close"):
                runner.close()
    if summary:
        print("\n## Grid: committed tokens/s (median of interleaved reps)\n")
        print("| model | ep | decay | batch | alpha | off | best fixed k | auto | auto mean k | auto / best | "
              "auto / off | MAPE | overhead |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for m, ep, d, b, a, off, bk, best, auto, mk, mape, ovh in summary:
            print(f"| {m} | {ep} | {d} | {b} | {a} | {off:.0f} | {best:.0f} (k={bk}) | {auto:.0f} | {mk:.2f} | "
                  f"{auto / best:.2f}x | {auto / off:.2f}x | {mape * 100 if mape is not None else float('nan'):.0f}% | "
                  f"{ovh * 100 if ovh is not None else float('nan'):.1f}% |")
        ratios_best = [s[8] / s[7] for s in summary]
        ratios_off = [s[8] / s[5] for s in summary]
        print(f"\nauto / best fixed k: min {min(ratios_best):.2f}x, median {statistics.median(ratios_best):.2f}x; "
              f"cells >= 0.97x: {sum(r >= 0.97 for r in ratios_best)}/{len(ratios_best)}")
        print(f"auto / off: min {min(ratios_off):.2f}x, median {statistics.median(ratios_off):.2f}x; "
              f"cells >= 0.98x: {sum(r >= 0.98 for r in ratios_off)}/{len(ratios_off)}")
    if variants:
        print("\n## auto variants (the same interleaved runs)\n")
        print("| model | ep | decay | batch | alpha | variant | auto | variant tokens/s | variant / auto | "
              "variant / best fixed k | auto mean k | variant mean k |")
        print("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for m, ep, d, b, a, v, auto, tv, best, mk, mv in variants:
            print(f"| {m} | {ep} | {d} | {b} | {a} | {v} | {auto:.0f} | {tv:.0f} | {tv / auto:.2f}x | "
                  f"{tv / best:.2f}x | {mk:.2f} | {mv:.2f} |")
        for v in args.auto_variant:
            rs = [x[7] / x[8] for x in variants if x[5] == v]
            print(f"\nauto[{v}] / best fixed k: median {statistics.median(rs):.2f}x; cells >= 0.97x: "
                  f"{sum(r >= 0.97 for r in rs)}/{len(rs)}")
    if args.real or args.real_only:
        rows += run_real(args, log)
    if args.step_fh:
        args.step_fh.close()
        print(f"\nstep records written to {args.step_log}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        print(f"\nrows written to {args.json}")
    if args.png and grid_rows(rows):
        heatmap(grid_rows(rows), args.png, args.ks_list)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
