"""Speculative decoding benchmark: goodput, the MoE verification tax, and batch 1 vs transformers.

    .venv/bin/python scripts/bench_spec.py [--quick] [--batches 1,4,16,64] [--ks 1,2,3,4,5,6,7,8]
        [--alpha 0.7] [--reps 3] [--new-tokens 32] [--min-tokens 256] [--out DIR] [--json PATH]
        [--sections grid,tax,hf]

Three models, random weights with a fixed seed (scripts/make_moe_bench.py), written
to --out (reused when already there) or to a temporary directory:
  moe-bench    Mixtral layout: 8 layers, hidden 512, 32 experts top-2 of FFN 512, 8/2 heads, vocab 8192
  dense-bench  Llama with the same ACTIVE parameters per token: the same attention, norms, embeddings
               and LM head, one MLP of 1024 = 2 experts x 512
  draft-bench  Llama, 2 layers, hidden 256, 4/2 heads, MLP 512, same vocabulary (the draft model)

1. Goodput (section "grid"). For moe-bench and dense-bench, batch B in --batches and speculation off
   or a fixed k in --ks: B random prompts of --prompt-len tokens, max(--new-tokens,
   ceil(--min-tokens / B)) greedy tokens each (ignore_eos; small batches generate more, so that each
   run draws enough acceptance coin flips), through Engine.generate_stream: the real engine path
   (scheduler, one target forward per step over [new token | drafts], greedy verification, commit).
   The drafter is SYNTHETIC: SyntheticProposer knows each prompt's true greedy continuation
   (recorded beforehand from the same model, speculation off, same batch) and proposes the true
   token at draft position j with probability alpha (a wrong token otherwise), so the acceptance is
   set by --alpha and is the same for both models (a fresh proposer with the same seed per run: the
   same coin flips; the measured acceptance still varies from k to k with the draws and is printed
   next to every figure), while every verification runs the real target forward. The drafter costs
   ~nothing; real drafters add their own time (see section 3). The continuations of random weights
   are degenerate (greedy decoding soon repeats one or two tokens), so the engine runs route
   narrower than real text would; section 2 uses random tokens instead. Figures: committed tokens/s
   = B * new tokens / wall time of the whole generate call (prefill included), speedup over
   speculation off at the same model and batch, median TPOT (per request: (time of its last token -
   time of its first token) / (tokens-1), median over requests), acceptance (accepted / drafted) and
   committed tokens per target step. Every run checks its output equals the recorded continuation.
   One Engine is built per run on one ModelRunner per model (the KV cache lives in the runner);
   per-request SamplingParams pick the k. Repetitions run every (model, config) of a batch size back
   to back, the configs rotated and the model order alternated from repetition to repetition; tables
   report medians over repetitions with min..max. An untimed warm-up (the recording run, and the
   largest k) comes first.

2. MoE tax (section "tax"). ModelRunner.run alone, no engine: for each batch size and model, B
   sequences with a --tax-ctx token context (prefilled once, untimed) each get a chunk of q random
   tokens at position --tax-ctx (the same rows rewritten every call, i.e. rolled back), q = 1 (a
   decode step) and q = k+1 for k in --tax-ks (a verification step); ratio t(k+1) / t(1), dense
   vs MoE, and the MoE's distinct experts per layer (routing statistics of an untimed call). Random
   tokens route like a trained model's varied text would; greedy decoding of random weights repeats
   tokens and routes narrower. Median over --tax-reps repetitions (q and model order rotated) of the
   mean of --tax-iters calls.

3. Batch 1 vs transformers (section "hf"). moe-bench in transformers' MixtralForCausalLM and in
   specmoe, one prompt of 64 tokens (a random 16-token phrase three times, then 16 random tokens, so
   prompt lookup finds matches), --hf-new-tokens greedy tokens, k = --hf-k:
     transformers: generate(do_sample=False) plain; assisted generation with draft-bench as
     assistant_model (num_assistant_tokens=k, schedule "constant", assistant_confidence_threshold 0:
     always k drafts, like specmoe); prompt lookup (prompt_lookup_num_tokens=k, its default
     max_matching_ngram_size 2);
     specmoe: speculation off; {"method": "draft_model", "k": k, "draft_model": draft-bench};
     {"method": "ngram", "k": k} (defaults min_n 1, max_n 3).
   Tokens/s = new tokens / wall time of the call. transformers does not report acceptance: the
   script wraps its candidate generators' update_candidate_strategy (called once per verification
   with the drafts' scores and the number of matches) to count it. The outputs are compared token
   for token. Goal (issue): specmoe >= 2x transformers' tokens/s, draft model vs assisted generation
   and n-gram vs prompt lookup. Random weights: the draft model's acceptance is ~0 and the greedy
   output of moe-bench soon repeats a token; both are reported as measured.

torch uses every core; on a shared machine any other process slows every figure many-fold: a warning
is printed when other processes took > 0.25 cores during a section or repetitions vary by > 1.5x.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import OtherLoad, cpu_model, loadavg  # noqa: E402
from make_moe_bench import (DENSE_BENCH, DRAFT_BENCH, MOE_BENCH, build_checkpoint,  # noqa: E402
                            build_dense_checkpoint, build_draft_checkpoint)

GOAL_HF = 2.0          # batch 1: specmoe tokens/s over transformers' (assisted generation, prompt lookup)
NOISY_RANGE = 1.5      # max / min of a configuration's repetitions above which it is flagged
NOISY_CORES = 0.25     # CPU taken by other processes (and steal) during a section above which it is flagged
MODELS = ("moe", "dense")
NAMES = {"moe": "moe-bench", "dense": "dense-bench"}


def median(xs):
    return statistics.median(xs)


def git_revision() -> str:
    """The checkout's commit (and whether the working tree differs from it), or "unknown"."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + (" (+ uncommitted changes)" if dirty else "")) if rev else "unknown"


def rotate(xs, r):
    r %= len(xs)
    return xs[r:] + xs[:r]


def cfg_name(k: int) -> str:
    return "off" if k == 0 else f"k={k}"


class Timed:
    """Wraps a bound method on its instance (no library change): counts calls and seconds."""

    def __init__(self, obj, name: str):
        self.obj, self.name, self.fn = obj, name, getattr(obj, name)
        self.calls, self.seconds = 0, 0.0
        setattr(obj, name, self)

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t
            self.calls += 1

    def restore(self):
        delattr(self.obj, self.name)      # the class's method shows through again


# ---------------------------------------------------------------- 1. goodput grid

def generate_timed(engine, prompts, params, runner, proposer):
    """One generate_stream call; wall time, TPOT per request, steps and acceptance, and where the
    time went (target forwards = runner.run, drafting = proposer.propose, the rest = engine)."""
    B = len(prompts)
    fwd = Timed(runner, "run")
    prop = Timed(proposer, "propose") if proposer is not None else None
    first, last = [None] * B, [None] * B
    ntok, nstep = [0] * B, [0] * B
    outs = [[] for _ in range(B)]
    drafted = accepted = 0
    try:
        t0 = time.perf_counter()
        for ch in engine.generate_stream(prompts, params):
            now = time.perf_counter()
            i = ch.index
            nstep[i] += 1
            drafted += ch.draft_tokens
            accepted += ch.accepted_tokens
            if ch.token_ids:
                if first[i] is None:
                    first[i] = now
                last[i] = now
                ntok[i] += len(ch.token_ids)
                outs[i] += ch.token_ids
        wall = time.perf_counter() - t0
    finally:
        fwd.restore()
        if prop is not None:
            prop.restore()
    tpot = [(last[i] - first[i]) / (ntok[i] - 1) for i in range(B) if ntok[i] > 1]
    return {
        "wall": wall, "tokens": sum(ntok), "tpot_median": median(tpot) if tpot else float("nan"),
        "engine_steps": fwd.calls, "forward_s": fwd.seconds, "propose_s": prop.seconds if prop else 0.0,
        "drafted": drafted, "accepted": accepted,
        "tokens_per_step": sum(ntok) / sum(nstep) if sum(nstep) else float("nan"), "outputs": outs,
    }


def run_grid(args, runners, V, log):
    from specmoe import Engine, SamplingParams
    from specmoe.drafter import SyntheticProposer

    configs = [0] + args.ks
    gen = torch.Generator().manual_seed(args.seed * 7919 + 1)
    pool = torch.randint(0, V, (max(args.batches), args.prompt_len), generator=gen).tolist()
    conts: dict[tuple[str, int], dict] = {}
    diverged: dict[tuple[str, int, int], str] = {}
    samples: dict[tuple[str, int, int], list[dict]] = {}

    def params(k, n):
        return SamplingParams(max_tokens=n, ignore_eos=True, speculation="off" if k == 0 else {"k": k})

    def new_tokens(B):
        return max(args.new_tokens, -(-args.min_tokens // B))

    def one(model, B, k, n=None, record=True):
        prompts = pool[:B]
        runner = runners[model]
        prop = SyntheticProposer(conts[model, B], args.alpha, 1.0, vocab_size=V, seed=args.seed * 1000 + k)
        eng = Engine(runner, proposer=prop, speculation={"k": max(k, 1)})
        try:
            res = generate_timed(eng, prompts, params(k, n or new_tokens(B)), runner, prop)
        except ValueError as e:              # the synthetic drafter saw an output off the recorded one
            diverged[model, B, k] = str(e)
            log(f"  DIVERGED {NAMES[model]} batch {B} {cfg_name(k)}: {e}")
            return None
        want = [conts[model, B][tuple(p)][:n or new_tokens(B)] for p in prompts]
        if res["outputs"] != want:
            diverged[model, B, k] = "output differs from the recorded greedy continuation"
            log(f"  DIVERGED {NAMES[model]} batch {B} {cfg_name(k)}: output differs from the recording")
            return None
        del res["outputs"]
        if record:
            samples.setdefault((model, B, k), []).append(res)
        return res

    # Record each (model, batch)'s greedy continuations with speculation off (untimed; also the warm-up
    # of "off"), then warm the largest k up.
    t0 = time.perf_counter()
    for B in args.batches:
        for model in MODELS:
            eng = Engine(runners[model])
            outs = eng.generate(pool[:B], SamplingParams(max_tokens=new_tokens(B), ignore_eos=True))
            conts[model, B] = {tuple(p): o.token_ids for p, o in zip(pool[:B], outs)}
            one(model, B, max(args.ks), record=False)
    distinct = {m: median([len(set(c)) for B in args.batches for c in conts[m, B].values()]) for m in MODELS}
    log(f"grid: continuations recorded and warm-up done in {time.perf_counter() - t0:.0f} s; distinct tokens "
        f"per greedy continuation (median over requests; {new_tokens(max(args.batches))}..."
        f"{new_tokens(min(args.batches))} tokens): "
        + ", ".join(f"{NAMES[m]} {distinct[m]:.0f}" for m in MODELS))

    load = OtherLoad()
    load.start()
    for rep in range(args.reps):
        t_rep = time.perf_counter()
        for bi, B in enumerate(args.batches):
            for model in (MODELS if rep % 2 == 0 else MODELS[::-1]):
                for k in rotate(configs, rep + bi):
                    if (model, B, k) not in diverged:
                        one(model, B, k)
        log(f"grid: repetition {rep + 1}/{args.reps} in {time.perf_counter() - t_rep:.0f} s")
    other = load.stop()

    rows = []
    for model in MODELS:
        for B in args.batches:
            for k in configs:
                s = samples.get((model, B, k))
                if not s:
                    rows.append({"model": NAMES[model], "batch": B, "k": k, "new_tokens": new_tokens(B),
                                 "diverged": diverged.get((model, B, k))})
                    continue
                tok_s = [x["tokens"] / x["wall"] for x in s]
                steps = median([x["engine_steps"] for x in s])
                wall = median([x["wall"] for x in s])
                rows.append({
                    "model": NAMES[model], "batch": B, "k": k, "diverged": None, "new_tokens": new_tokens(B),
                    "tok_s": median(tok_s), "tok_s_min": min(tok_s), "tok_s_max": max(tok_s),
                    "tpot_ms": median([x["tpot_median"] for x in s]) * 1e3,
                    "acceptance": s[0]["accepted"] / s[0]["drafted"] if s[0]["drafted"] else None,
                    "acceptance_all_reps": [x["accepted"] / x["drafted"] if x["drafted"] else None for x in s],
                    "tokens_per_step": s[0]["tokens_per_step"], "engine_steps": steps,
                    "ms_per_step": wall / steps * 1e3,
                    "forward_ms_per_step": median([x["forward_s"] / x["engine_steps"] for x in s]) * 1e3,
                    "propose_ms_per_step": median([x["propose_s"] / x["engine_steps"] for x in s]) * 1e3,
                    "wall_s_samples": [x["wall"] for x in s],
                })
    for r in rows:
        off = next((o for o in rows if o["model"] == r["model"] and o["batch"] == r["batch"] and o["k"] == 0), None)
        if r.get("tok_s") and off and off.get("tok_s"):
            r["speedup"] = r["tok_s"] / off["tok_s"]
    return {"rows": rows, "other_load": other, "diverged": {f"{NAMES[m]}/{b}/{cfg_name(k)}": v
                                                            for (m, b, k), v in diverged.items()},
            "distinct_tokens_per_continuation": {NAMES[m]: distinct[m] for m in MODELS}}


def print_grid(args, grid):
    rows = grid["rows"]
    configs = [0] + args.ks
    get = {(r["model"], r["batch"], r["k"]): r for r in rows}
    hdr = "| model | batch | new tokens/request | " + " | ".join(cfg_name(k) for k in configs) + " |"
    sep = "|---|---:|---:|" + "---:|" * len(configs)
    ntok = {r["batch"]: r["new_tokens"] for r in rows}

    def cell(r, f):
        if r is None:
            return "-"
        if r.get("diverged"):
            return "diverged"
        return f(r)

    print(f"Committed tokens/s (speedup over speculation off), SYNTHETIC drafter at alpha {args.alpha}; "
          f"prompt {args.prompt_len} tokens, max({args.new_tokens}, ceil({args.min_tokens} / batch)) new tokens per "
          f"request, prefill included; median of {args.reps} repetitions:")
    print()
    print(hdr)
    print(sep)
    for m in MODELS:
        for B in args.batches:
            print(f"| {NAMES[m]} | {B} | {ntok[B]} | " + " | ".join(
                cell(get.get((NAMES[m], B, k)), lambda r: f"{r['tok_s']:.0f} ({r['speedup']:.2f}x)" if r["k"]
                     else f"{r['tok_s']:.0f}") for k in configs) + " |")
    print()
    print("Median TPOT in ms (time per output token after the first, per request; median over requests, "
          "then over repetitions), same runs:")
    print()
    print(hdr)
    print(sep)
    for m in MODELS:
        for B in args.batches:
            print(f"| {NAMES[m]} | {B} | {ntok[B]} | " + " | ".join(
                cell(get.get((NAMES[m], B, k)), lambda r: f"{r['tpot_ms']:.1f}") for k in configs) + " |")
    print()
    print("Acceptance (accepted / drafted) and committed tokens per target step, same runs (the synthetic "
          "drafter draws the same coin flips for both models):")
    print()
    print("| model | batch | " + " | ".join(cfg_name(k) for k in args.ks) + " |")
    print("|---|---:|" + "---:|" * len(args.ks))
    for m in MODELS:
        for B in args.batches:
            print(f"| {NAMES[m]} | {B} | " + " | ".join(
                cell(get.get((NAMES[m], B, k)), lambda r: f"{r['acceptance']:.2f} / {r['tokens_per_step']:.2f}")
                for k in args.ks) + " |")
    print()
    print("Detail: tokens/s median [min..max] over repetitions; per engine step: wall ms, of which the target "
          "forward (ModelRunner.run) and drafting (proposer.propose; SYNTHETIC here), the rest is the engine "
          "(scheduling, verification, commit, streaming):")
    print()
    print("| model | batch | config | tok/s [min..max] | speedup | TPOT ms | acceptance | tokens/step | steps "
          "| ms/step | forward ms/step | drafting ms/step | engine rest ms/step |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r.get("diverged"):
            print(f"| {r['model']} | {r['batch']} | {cfg_name(r['k'])} | diverged: {r['diverged'][:60]} "
                  "| | | | | | | | | |")
            continue
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        rest = r["ms_per_step"] - r["forward_ms_per_step"] - r["propose_ms_per_step"]
        print(f"| {r['model']} | {r['batch']} | {cfg_name(r['k'])} | {r['tok_s']:.0f} [{r['tok_s_min']:.0f}.."
              f"{r['tok_s_max']:.0f}] | {r.get('speedup', 1.0):.2f}x | {r['tpot_ms']:.2f} | {acc} "
              f"| {r['tokens_per_step']:.2f} | {r['engine_steps']:.0f} | {r['ms_per_step']:.2f} "
              f"| {r['forward_ms_per_step']:.2f} | {r['propose_ms_per_step']:.3f} | {rest:.2f} |")
    print()
    best = {}
    for m in MODELS:
        for B in args.batches:
            c = [r for r in rows if r["model"] == NAMES[m] and r["batch"] == B and r["k"] and r.get("tok_s")]
            if c:
                b = max(c, key=lambda r: r["tok_s"])
                best[NAMES[m], B] = b
    if best:
        print("Best fixed k per model and batch (SYNTHETIC alpha "
              f"{args.alpha}): " + "; ".join(f"{m} b{B}: {cfg_name(r['k'])} {r['speedup']:.2f}x"
                                             for (m, B), r in best.items()))
        print()


# ---------------------------------------------------------------- 2. MoE tax

def run_tax(args, runners, V, log):
    from specmoe.experts.batch import Chunk

    qs = [1] + [k + 1 for k in args.tax_ks]
    gen = torch.Generator().manual_seed(args.seed * 7919 + 2)
    times: dict[tuple[str, int, int], list[float]] = {}
    distinct: dict[tuple[int, int], float] = {}
    load = OtherLoad()
    load.start()
    for B in args.batches:
        ctx = torch.randint(0, V, (B, args.tax_ctx), generator=gen).tolist()
        toks = {q: torch.randint(0, V, (B, q), generator=gen).tolist() for q in qs}
        slots = {}
        for m in MODELS:
            r = runners[m]
            slots[m] = [r.cache.allocate() for _ in range(B)]
            r.run([Chunk(s, 0, c) for s, c in zip(slots[m], ctx)])
        try:
            def call(m, q, routing=False):
                return runners[m].run([Chunk(s, args.tax_ctx, t) for s, t in zip(slots[m], toks[q])],
                                      num_logits=[q] * B, routing=routing)
            for m in MODELS:          # warm-up, and the routing of each q (untimed)
                for q in qs:
                    out = call(m, q, routing=(m == "moe"))
                    if m == "moe":
                        distinct[B, q] = out.routing.mean_distinct
            for rep in range(args.tax_reps):
                for m in (MODELS if rep % 2 == 0 else MODELS[::-1]):
                    for q in rotate(qs, rep):
                        t = time.perf_counter()
                        for _ in range(args.tax_iters):
                            call(m, q)
                        times.setdefault((m, B, q), []).append((time.perf_counter() - t) / args.tax_iters)
        finally:
            for m in MODELS:
                for s in slots[m]:
                    runners[m].cache.free(s)
        log(f"tax: batch {B} done")
    other = load.stop()
    rows = []
    for B in args.batches:
        for q in qs:
            row = {"batch": B, "q": q, "k": q - 1, "moe_distinct_experts_per_layer": distinct[B, q]}
            for m in MODELS:
                s = times[m, B, q]
                row[f"{m}_ms"] = median(s) * 1e3
                row[f"{m}_ms_min"], row[f"{m}_ms_max"] = min(s) * 1e3, max(s) * 1e3
                row[f"{m}_ms_samples"] = [x * 1e3 for x in s]
            for m in MODELS:
                row[f"{m}_ratio"] = median(times[m, B, q]) / median(times[m, B, 1])
            row["tax"] = row["moe_ratio"] / row["dense_ratio"]
            rows.append(row)
    return {"rows": rows, "other_load": other}


def print_tax(args, tax, E, K):
    print(f"Verification step vs 1-token step, ModelRunner.run alone (no engine), context {args.tax_ctx} tokens, "
          f"random tokens; median of {args.tax_reps} repetitions x {args.tax_iters} calls [min..max]. "
          "ratio = t(k+1) / t(1) of the same model and batch; MoE tax = MoE ratio / dense ratio; experts = "
          "distinct experts per MoE layer the step routes to (uniform-routing expectation in brackets):")
    print()
    print("| batch | k | tokens/seq | dense ms | dense ratio | MoE ms | MoE ratio | MoE tax | MoE/dense time "
          "| MoE experts/layer |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in tax["rows"]:
        n = r["batch"] * r["q"]
        exp = E * (1 - (1 - K / E) ** n)
        print(f"| {r['batch']} | {r['k'] if r['k'] else '- (decode)'} | {r['q']} "
              f"| {r['dense_ms']:.2f} [{r['dense_ms_min']:.2f}..{r['dense_ms_max']:.2f}] | {r['dense_ratio']:.2f} "
              f"| {r['moe_ms']:.2f} [{r['moe_ms_min']:.2f}..{r['moe_ms_max']:.2f}] | {r['moe_ratio']:.2f} "
              f"| {r['tax']:.2f} | {r['moe_ms'] / r['dense_ms']:.2f} "
              f"| {r['moe_distinct_experts_per_layer']:.1f} ({exp:.1f}) |")
    print()


# ---------------------------------------------------------------- 3. batch 1 vs transformers

class HFAcceptance:
    """Counts drafts and matches of transformers' assisted decoding: its loop calls the candidate
    generator's update_candidate_strategy(input_ids, scores, num_matches) once per verification,
    scores holding the candidate_length + 1 verified rows. Wraps the two classes used here."""

    def __init__(self):
        from transformers.generation import candidate_generator as cg
        self.drafted = self.accepted = self.steps = 0
        self.patched = []
        for cls in (cg.AssistedCandidateGenerator, cg.PromptLookupCandidateGenerator):
            orig = cls.__dict__.get("update_candidate_strategy")
            base = cls.update_candidate_strategy

            def wrap(gen_self, input_ids, scores, num_matches, _base=base):
                self.drafted += scores.shape[1] - 1
                self.accepted += int(num_matches)
                self.steps += 1
                return _base(gen_self, input_ids, scores, num_matches)
            cls.update_candidate_strategy = wrap
            self.patched.append((cls, orig))

    def reset(self):
        self.drafted = self.accepted = self.steps = 0

    def restore(self):
        for cls, orig in self.patched:
            if orig is None:
                delattr(cls, "update_candidate_strategy")
            else:
                cls.update_candidate_strategy = orig


def run_hf(args, paths, runners, V, log):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    from specmoe import Engine, SamplingParams

    k, N = args.hf_k, args.hf_new_tokens
    gen = torch.Generator().manual_seed(args.seed * 7919 + 3)
    phrase = torch.randint(0, V, (16,), generator=gen).tolist()
    prompt = phrase * 3 + torch.randint(0, V, (16,), generator=gen).tolist()
    t0 = time.perf_counter()
    target = MixtralForCausalLM.from_pretrained(paths["moe"], dtype=torch.float32).eval()
    draft = LlamaForCausalLM.from_pretrained(paths["draft"], dtype=torch.float32).eval()
    for mdl in (target, draft):
        mdl.generation_config.eos_token_id = None      # like ignore_eos: always N new tokens
    draft.generation_config.num_assistant_tokens = k
    draft.generation_config.num_assistant_tokens_schedule = "constant"
    draft.generation_config.assistant_confidence_threshold = 0.0
    cfgs = getattr(target.config, "_attn_implementation", "?"), getattr(target.config, "_experts_implementation", None)
    log(f"hf: transformers models loaded in {time.perf_counter() - t0:.1f} s (attn {cfgs[0]}, experts {cfgs[1]})")
    ids = torch.tensor([prompt])
    acc = HFAcceptance()

    def hf(kw):
        def f():
            acc.reset()
            out = target.generate(ids, max_new_tokens=N, do_sample=False, **kw)
            return out[0, len(prompt):].tolist(), (acc.drafted, acc.accepted, acc.steps)
        return f

    engines = {
        "specmoe off": Engine(runners["moe"], speculation="off"),
        "specmoe draft_model": Engine(runners["moe"], speculation={"method": "draft_model", "k": k,
                                                                    "draft_model": str(paths["draft"])}),
        "specmoe ngram": Engine(runners["moe"], speculation={"method": "ngram", "k": k}),
    }
    sp = SamplingParams(max_tokens=N, ignore_eos=True)

    split: dict[str, list[tuple[float, float, float]]] = {}    # specmoe: (wall, forward, drafting) seconds

    def sm(name):
        def f():
            eng = engines[name]
            fwd = Timed(eng.runner, "run")
            prop = Timed(eng.proposer, "propose") if eng.proposer is not None else None
            t = time.perf_counter()
            try:
                o = eng.generate([prompt], sp)[0]
            finally:
                fwd.restore()
                if prop is not None:
                    prop.restore()
            split.setdefault(name, []).append((time.perf_counter() - t, fwd.seconds, prop.seconds if prop else 0.0))
            return o.token_ids, (o.stats.draft_tokens, o.stats.accepted_tokens, o.stats.steps)
        return f

    methods = {
        "transformers greedy": hf({}),
        "transformers assisted": hf({"assistant_model": draft}),
        "transformers prompt lookup": hf({"prompt_lookup_num_tokens": k}),
        "specmoe off": sm("specmoe off"),
        "specmoe draft_model": sm("specmoe draft_model"),
        "specmoe ngram": sm("specmoe ngram"),
    }
    names = list(methods)
    outputs, stats, times = {}, {}, {n: [] for n in names}
    try:
        for n in names:                   # warm-up (untimed); outputs and acceptance are deterministic
            outputs[n], stats[n] = methods[n]()
        load = OtherLoad()
        load.start()
        for rep in range(args.hf_reps):
            for n in rotate(names, rep):
                t = time.perf_counter()
                out, st = methods[n]()
                times[n].append(time.perf_counter() - t)
                if out != outputs[n] or st != stats[n]:
                    log(f"  WARNING: {n} gave a different output or acceptance in repetition {rep + 1}")
        other = load.stop()
    finally:
        acc.restore()
    ref = outputs["specmoe off"]
    rows = []
    for n in names:
        d, a, steps = stats[n]
        o = outputs[n]
        first_diff = next((i for i, (x, y) in enumerate(zip(o, ref)) if x != y), None)
        sp_ms = None
        if n in split:
            steps_n = max(steps, 1)
            sp_ms = {"wall": median([w for w, _, _ in split[n]]) / steps_n * 1e3,
                     "forward": median([f_ for _, f_, _ in split[n]]) / steps_n * 1e3,
                     "drafting": median([d_ for _, _, d_ in split[n]]) / steps_n * 1e3}
        rows.append({"method": n, "specmoe_ms_per_step": sp_ms,
                     "tok_s": N / median(times[n]), "tok_s_min": N / max(times[n]),
                     "tok_s_max": N / min(times[n]), "ms_samples": [x * 1e3 for x in times[n]],
                     "drafted": d, "accepted": a, "verify_steps": steps,
                     "acceptance": a / d if d else None, "same_as_specmoe_off": o == ref,
                     "first_difference": first_diff, "tokens": len(o)})
    by = {r["method"]: r for r in rows}
    pairs = [("specmoe draft_model", "transformers assisted"), ("specmoe ngram", "transformers prompt lookup"),
             ("specmoe off", "transformers greedy")]
    ratios = {f"{a} / {b}": by[a]["tok_s"] / by[b]["tok_s"] for a, b in pairs}
    return {"rows": rows, "ratios": ratios, "other_load": other, "prompt": prompt, "k": k, "new_tokens": N,
            "distinct_output_tokens": len(set(ref)), "output_head": ref[:16],
            "transformers_impl": {"attn": cfgs[0], "experts": cfgs[1]}}


def print_hf(args, res):
    k, N = res["k"], res["new_tokens"]
    print(f"Batch 1, moe-bench, greedy, one 64-token prompt with a repeated phrase, {N} new tokens, k = {k}; "
          f"draft model draft-bench (random weights); median of {args.hf_reps} repetitions [min..max], "
          f"methods interleaved:")
    print()
    print("| method | tok/s [min..max] | drafted | accepted | acceptance | target steps | same tokens as specmoe off "
          "| specmoe ms/step: all = forward + drafting + rest |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for r in res["rows"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        same = "yes" if r["same_as_specmoe_off"] else f"no (first difference at token {r['first_difference']})"
        steps = r["verify_steps"] if r["method"] != "transformers greedy" else N
        m = r["specmoe_ms_per_step"]
        split = "" if m is None else (f"{m['wall']:.2f} = {m['forward']:.2f} + {m['drafting']:.2f} + "
                                      f"{m['wall'] - m['forward'] - m['drafting']:.2f}")
        print(f"| {r['method']} | {r['tok_s']:.1f} [{r['tok_s_min']:.1f}..{r['tok_s_max']:.1f}] | {r['drafted']} "
              f"| {r['accepted']} | {acc} | {steps} | {same} | {split} |")
    print()
    print("(target steps: target forwards, the first one (prompt + first drafts) included; transformers' are "
          "counted by its candidate generator's update_candidate_strategy calls, plain greedy = new tokens.)")
    print()
    print(f"moe-bench's greedy output has {res['distinct_output_tokens']} distinct tokens in {N} "
          f"(first 16: {res['output_head']}).")
    print()
    for name, ratio in res["ratios"].items():
        goal = "" if "off" in name else f" -> goal >= {GOAL_HF:.0f}x {'MET' if ratio >= GOAL_HF else 'NOT MET'}"
        print(f"{name}: {ratio:.2f}x{goal}")
    print()


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (~1 min): batches 1,4, k 1,2,4,8, 2 repetitions, fewer tokens; explicit "
                         "options still win")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,4,16,64)")
    ap.add_argument("--ks", default=None, help="fixed k values of the goodput grid (default 1,...,8)")
    ap.add_argument("--alpha", type=float, default=0.7,
                    help="SYNTHETIC drafter: probability each draft token is the true one (default 0.7)")
    ap.add_argument("--prompt-len", type=int, default=32, help="grid prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="grid new tokens per request (default 32)")
    ap.add_argument("--min-tokens", type=int, default=None,
                    help="grid: at least this many new tokens per run in all, i.e. max(--new-tokens, "
                         "ceil(min / batch)) per request (default 256)")
    ap.add_argument("--reps", type=int, default=None, help="grid repetitions (default 3)")
    ap.add_argument("--tax-ks", default="1,3,7", help="k of the verification steps timed (default 1,3,7)")
    ap.add_argument("--tax-ctx", type=int, default=64, help="context before the timed chunk (default 64)")
    ap.add_argument("--tax-reps", type=int, default=None, help="MoE tax repetitions (default 5)")
    ap.add_argument("--tax-iters", type=int, default=None, help="calls per MoE tax sample (default 3)")
    ap.add_argument("--hf-k", type=int, default=4, help="k of the batch-1 comparison (default 4)")
    ap.add_argument("--hf-new-tokens", type=int, default=None, help="batch-1 new tokens (default 64)")
    ap.add_argument("--hf-reps", type=int, default=None, help="batch-1 repetitions (default 5)")
    ap.add_argument("--sections", default="grid,tax,hf", help="which sections to run (default grid,tax,hf)")
    ap.add_argument("--out", default=None,
                    help="checkpoint cache dir, holding moe-bench/, dense-bench/, draft-bench/ (default: a "
                         "temporary directory)")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts seed (default 0)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = ap.parse_args(argv)
    q = args.quick
    defaults = {"batches": "1,4" if q else "1,4,16,64", "ks": "1,2,4,8" if q else "1,2,3,4,5,6,7,8",
                "new_tokens": 16 if q else 32, "min_tokens": 64 if q else 256, "reps": 2 if q else 3,
                "tax_reps": 3 if q else 5,
                "tax_iters": 2 if q else 3, "hf_new_tokens": 32 if q else 64, "hf_reps": 2 if q else 5}
    for key, v in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, v)

    def ints(s, name):
        try:
            xs = [int(x) for x in s.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--{name} needs comma-separated integers")
        if not xs or min(xs) < 1:
            ap.error(f"--{name} needs positive integers")
        return xs
    args.batches, args.ks, args.tax_ks = ints(args.batches, "batches"), ints(args.ks, "ks"), ints(args.tax_ks, "tax-ks")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if set(args.sections) - {"grid", "tax", "hf"}:
        ap.error("--sections takes grid, tax, hf")
    if not 0.0 <= args.alpha <= 1.0:
        ap.error("--alpha must be in [0, 1]")
    for key in ("prompt_len", "new_tokens", "min_tokens", "reps", "tax_ctx", "tax_reps", "tax_iters", "hf_k",
                "hf_new_tokens",
                "hf_reps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    torch.manual_seed(args.seed)
    machine = {"cpu_model": cpu_model(), "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}
    try:
        import transformers
        machine["transformers"] = transformers.__version__
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        print("transformers builds the checkpoints and is the baseline: pip install -e '.[test]'", file=sys.stderr)
        return 2
    import specmoe

    def log(msg):
        print(f"[{time.perf_counter() - t_run:5.0f} s] {msg}", flush=True)

    print("# specmoe speculative decoding benchmark (moe-bench vs dense-bench)")
    print()
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"machine: {machine['cpu_model']}; os.cpu_count()={machine['os_cpu_count']}, "
          f"torch.get_num_threads()={machine['torch_threads']}; device cpu")
    machine["specmoe_commit"] = git_revision()
    print(f"versions: specmoe {specmoe.__version__} at commit {machine['specmoe_commit']}, torch {machine['torch']}, "
          f"transformers {machine['transformers']}, python {machine['python']}")
    machine["loadavg_start"] = loadavg()
    print(f"load average at start (1/5/15 min): {machine['loadavg_start']}")
    print(f"settings: sections {args.sections}; grid: batches {args.batches}, off + k {args.ks}, SYNTHETIC drafter "
          f"alpha {args.alpha}, prompt {args.prompt_len}, max({args.new_tokens}, ceil({args.min_tokens}/batch)) new "
          f"tokens, {args.reps} reps; tax: k "
          f"{args.tax_ks}, context {args.tax_ctx}, {args.tax_reps} reps x {args.tax_iters} calls; hf: k {args.hf_k}, "
          f"{args.hf_new_tokens} new tokens, {args.hf_reps} reps; float32; seed {args.seed}")

    tmp = None
    if args.out:
        root = Path(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-spec-")
        root = Path(tmp.name)
    t0 = time.perf_counter()
    paths = {"moe": build_checkpoint(root / "moe-bench", args.seed),
             "dense": build_dense_checkpoint(root / "dense-bench", args.seed),
             "draft": build_draft_checkpoint(root / "draft-bench", args.seed)}
    print(f"checkpoints in {root} (ready in {time.perf_counter() - t0:.1f} s): moe-bench {MOE_BENCH}; "
          f"dense-bench LlamaForCausalLM {DENSE_BENCH}; draft-bench LlamaForCausalLM {DRAFT_BENCH}")

    from specmoe.experts.runner import ModelRunner
    max_b = max(args.batches + [1])
    grid_tokens = max(args.new_tokens, -(-args.min_tokens // min(args.batches)))
    cap = max(args.prompt_len + grid_tokens + max(args.ks) + 2, args.tax_ctx + max(args.tax_ks) + 1,
              64 + args.hf_new_tokens + args.hf_k + 2)
    t0 = time.perf_counter()
    runners = {m: ModelRunner.from_pretrained(paths[m], device="cpu", dtype="float32", max_seqs=max_b,
                                              max_seq_len=cap) for m in MODELS}
    cfg = runners["moe"].config
    V = cfg.vocab_size
    nparams = {m: sum(p.numel() for p in runners[m].model.parameters()) for m in MODELS}
    moe_active = nparams["moe"] - cfg.num_layers * (cfg.moe.num_experts - cfg.moe.top_k) * 3 * cfg.hidden_size \
        * cfg.moe.expert_ffn
    print(f"specmoe runners loaded in {time.perf_counter() - t0:.1f} s (max_seqs {max_b}, max_seq_len {cap}); "
          f"parameters: moe-bench {nparams['moe'] / 1e6:.1f} M total, {moe_active / 1e6:.1f} M active per token; "
          f"dense-bench {nparams['dense'] / 1e6:.1f} M")
    print()

    results = {}
    if "grid" in args.sections:
        results["grid"] = run_grid(args, runners, V, log)
    if "tax" in args.sections:
        results["tax"] = run_tax(args, runners, V, log)
    if "hf" in args.sections:
        results["hf"] = run_hf(args, paths, runners, V, log)
    print()

    noisy = []
    for sec, res in results.items():
        o = res.get("other_load")
        if o and o[0] + o[1] > NOISY_CORES:
            noisy.append(f"{sec}: other processes {o[0]:.2f} cores, steal {o[1]:.2f}")
    if "grid" in results:
        for r in results["grid"]["rows"]:
            w = r.get("wall_s_samples")
            if w and max(w) > NOISY_RANGE * min(w):
                noisy.append(f"grid {r['model']} b{r['batch']} {cfg_name(r['k'])}: reps {min(w):.2f}..{max(w):.2f} s")
    if "tax" in results:
        for r in results["tax"]["rows"]:
            for m in MODELS:
                if r[f"{m}_ms_max"] > NOISY_RANGE * r[f"{m}_ms_min"]:
                    noisy.append(f"tax {NAMES[m]} b{r['batch']} q{r['q']}: {r[f'{m}_ms_min']:.1f}.."
                                 f"{r[f'{m}_ms_max']:.1f} ms")
    if "hf" in results:
        for r in results["hf"]["rows"]:
            if r["tok_s_max"] > NOISY_RANGE * r["tok_s_min"]:
                noisy.append(f"hf {r['method']}: {r['tok_s_min']:.1f}..{r['tok_s_max']:.1f} tok/s")

    if "grid" in results:
        print("## 1. Goodput, SYNTHETIC drafter")
        print()
        print_grid(args, results["grid"])
    if "tax" in results:
        print("## 2. MoE tax: verification step over 1-token step")
        print()
        print_tax(args, results["tax"], cfg.moe.num_experts, cfg.moe.top_k)
    if "hf" in results:
        print("## 3. Batch 1 vs transformers (real drafters)")
        print()
        print_hf(args, results["hf"])

    machine["loadavg_end"] = loadavg()
    print(f"load average at end: {machine['loadavg_end']}")
    for sec, res in results.items():
        o = res.get("other_load")
        if o:
            print(f"{sec}: other processes {o[0]:.2f} cores, steal {o[1]:.2f} cores on average")
    if noisy:
        print(f"WARNING: {len(noisy)} measurements look disturbed (other processes > {NOISY_CORES} cores during a "
              f"section, or repetitions differing by > {NOISY_RANGE}x): " + "; ".join(noisy[:12])
              + (" ..." if len(noisy) > 12 else "")
              + ". With torch using every core, any competing process slows the figures many-fold: rerun on a "
                "quiet machine before quoting them.")
    machine["disturbed"] = noisy

    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": [sys.executable] + sys.argv, "machine": machine,
            "settings": {k: v for k, v in vars(args).items() if k not in ("json",)},
            "models": {"moe-bench": MOE_BENCH, "dense-bench": DENSE_BENCH, "draft-bench": DRAFT_BENCH},
            "drafter_grid": "SYNTHETIC", "results": results}, indent=2, default=str))
        print(f"wrote {args.json}")
    if tmp is not None:
        tmp.cleanup()
    print(f"\ntotal wall time {time.perf_counter() - t_run:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
