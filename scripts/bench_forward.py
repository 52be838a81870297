"""Decode-step benchmark: specmoe vs transformers' MixtralForCausalLM vs the memory roofline.

    .venv/bin/python scripts/bench_forward.py [--batches 1,4,16,64] [--steps 32] [--reps 7]
                                              [--prompt-len 64] [--dtype float32] [--out DIR] [--json PATH]

The "moe-bench" checkpoint (8 layers, hidden 512, 32 experts top-2 of FFN 512,
8 query / 2 KV heads of 64, vocab 8192; random weights with a fixed seed in
Mixtral format, see make_moe_bench.py) is written to --out (reused when it is
already there) or to a temporary directory. Both engines load the same weights
and run in this one process.

For every batch size B: each sequence gets a random prompt of --prompt-len
tokens, prefilled once per engine (not timed). A repetition then times --steps
greedy decode steps from that same cache state, feeding each step's argmax back
as the next token: specmoe through ModelRunner.run with one 1-token Chunk per
sequence, transformers through model(ids, past_key_values=DynamicCache, use_cache=True)
under torch.inference_mode. Repetitions alternate the two engines (and which
one goes first); the table reports medians over repetitions, tokens/s =
B * steps / time. One untimed warm-up repetition per engine comes first; the
specmoe one records routing statistics (the timed ones do not). With --feed
random, every step still computes the argmax, but the next input comes from a
fixed random token stream shared by both engines: greedy decoding on random
weights tends to repeat one token, so every step routes to the same experts
and the weights a repetition touches may stay in the last-level cache; the
"over all steps" expert count printed per batch shows which case a run is in.

Roofline: the bytes a decode step must read at batch B are the B embedding rows,
per layer the attention weights (q,k,v,o), the router, the two RMSNorm weights
and the distinct experts the step routes to (3*D*F weights each; MEASURED from
specmoe's routing statistics of the warm-up repetition, which routes exactly
like the timed ones because it decodes the same tokens from the same cache),
the final norm and the LM head, plus the KV cache rows attention reads (context
* layers * 2 * G * d * B). Bandwidth is a large tensor copy (dst.copy_(src) of
--copy-mib MiB, counting bytes read + bytes written, as STREAM does) timed a few
times before every batch size; its median over the run is used. Roofline time
= bytes / bandwidth; "% of roofline" = roofline time / measured step time.
"""

import argparse
import copy
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
from make_moe_bench import MOE_BENCH, build_checkpoint  # noqa: E402

GOAL_SPEEDUP = 3.0     # batch 1: specmoe tokens/s over transformers'
GOAL_ROOFLINE = 0.60   # batch 1: roofline time / specmoe step time


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(xs):
    return statistics.median(xs)


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class OtherLoad:
    """CPU time other processes (and the hypervisor, as steal) took while a section ran,
    in cores: (busy jiffies of the whole machine - this process's CPU time) / wall time."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _read(self):
        try:
            f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = f[0] + f[1] + f[2] + f[5] + f[6]          # user nice system irq softirq
        steal = f[7] if len(f) > 7 else 0
        t = os.times()
        return time.perf_counter(), busy / self.tick, steal / self.tick, t.user + t.system

    def start(self):
        self.t0 = self._read()

    def stop(self) -> tuple[float, float] | None:
        t1 = self._read()
        if self.t0 is None or t1 is None:
            return None
        wall = t1[0] - self.t0[0]
        other = (t1[1] - self.t0[1]) - (t1[3] - self.t0[3])
        return max(other, 0.0) / wall, (t1[2] - self.t0[2]) / wall


# ---------------------------------------------------------------- bandwidth

class CopyBandwidth:
    """Large tensor copy bandwidth in bytes/s ((read + written) / time)."""

    def __init__(self, mib: int):
        n = mib * 2**20 // 4
        self.src = torch.ones(n, dtype=torch.float32)
        self.dst = torch.zeros(n, dtype=torch.float32)
        self.dst.copy_(self.src)                       # touch every page once
        self.samples: list[float] = []

    def measure(self, reps: int = 5) -> float:
        nbytes = 2 * self.src.numel() * self.src.element_size()
        for _ in range(reps):
            t0 = time.perf_counter()
            self.dst.copy_(self.src)
            self.samples.append(nbytes / (time.perf_counter() - t0))
        return median(self.samples)

    def read_only(self, reps: int = 5) -> float:
        """Informational: a reduction that only reads (bytes read / time)."""
        nbytes = self.src.numel() * self.src.element_size()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            self.src.sum()
            out.append(nbytes / (time.perf_counter() - t0))
        return median(out)


# ---------------------------------------------------------------- engines

class SpecmoeDecoder:
    def __init__(self, path, dtype: str, max_batch: int, max_seq_len: int):
        from specmoe import Engine
        from specmoe.experts.batch import Chunk
        self.Chunk = Chunk
        self.engine = Engine.from_pretrained(path, device="cpu", dtype=dtype, max_batch=max_batch,
                                             max_seq_len=max_seq_len)
        self.runner = self.engine.runner
        self.slots: list[int] = []

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        for s in self.slots:
            self.runner.cache.free(s)
        self.slots = [self.runner.cache.allocate() for _ in prompts]
        self.prompt_len = len(prompts[0])
        out = self.runner.run([self.Chunk(s, 0, p) for s, p in zip(self.slots, prompts)])
        self.first = out.logits.argmax(-1).tolist()
        return out.logits

    def decode(self, steps: int, feed=None, routing: bool = False):
        """`steps` decode steps after the prompt, each feeding back its argmax (or, with
        feed, feed[t + 1]); returns (argmax tokens per step, routing snapshots)."""
        Chunk, run, slots, P = self.Chunk, self.runner.run, self.slots, self.prompt_len
        toks, seen, snaps = self.first if feed is None else feed[0], [], []
        for t in range(steps):
            out = run([Chunk(s, P + t, [tok]) for s, tok in zip(slots, toks)], routing=routing)
            toks = out.logits.argmax(-1).tolist()
            seen.append(toks)
            if feed is not None and t + 1 < steps:
                toks = feed[t + 1]
            if routing:   # copy now: on a CPU model the snapshot's tensor is the live counts buffer
                snaps.append((list(out.routing.distinct_experts), out.routing.tokens_per_expert.clone()))
        return seen, snaps


class HFDecoder:
    def __init__(self, path, dtype: str):
        from transformers import MixtralForCausalLM
        self.model = MixtralForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        cfg = self.model.config
        self.attn_impl = getattr(cfg, "_attn_implementation", "?")
        self.experts_impl = getattr(cfg, "_experts_implementation", None) or "?"

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        out = self.model(torch.tensor(prompts), use_cache=True, logits_to_keep=1)
        self.cache0 = out.past_key_values            # DynamicCache after the prompt
        logits = out.logits[:, -1].float()
        self.first = logits.argmax(-1).tolist()
        return logits

    def fresh_cache(self):
        return copy.deepcopy(self.cache0)

    @torch.inference_mode()
    def decode(self, steps: int, cache, feed=None):
        model, seen = self.model, []
        ids = torch.tensor(self.first if feed is None else feed[0])[:, None]
        for t in range(steps):
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            toks = out.logits[:, -1].argmax(-1).tolist()
            seen.append(toks)
            if feed is not None and t + 1 < steps:
                toks = feed[t + 1]
            ids = torch.tensor(toks)[:, None]
        return seen


# ---------------------------------------------------------------- roofline

def step_bytes(c, B: int, distinct_per_layer: float, ctx: float, elem: int) -> dict:
    """Bytes one decode step at batch B reads (weights + KV cache), by part."""
    D, L, H, G, d, V = c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size
    m = c.moe
    attn = ((H + 2 * G) * d * D + D * H * d) * elem
    router = m.num_experts * D * elem
    norms = 2 * D * elem
    expert = 3 * D * m.expert_ffn * elem
    parts = {
        "embedding": B * D * elem,
        "attention": L * attn,
        "router+norms": L * (router + norms) + D * elem,
        "experts": L * distinct_per_layer * expert,
        "lm_head": V * D * elem,
        "kv_cache": ctx * L * 2 * G * d * elem * B,
    }
    parts["total"] = sum(parts.values())
    return parts


def expected_distinct(E: int, K: int, B: int) -> float:
    return E * (1 - (1 - K / E) ** B)


# ---------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,4,16,64", help="comma-separated batch sizes (default 1,4,16,64)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per repetition (default 32)")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per engine and batch (default 7)")
    ap.add_argument("--prompt-len", type=int, default=64, help="prefilled prompt tokens per sequence (default 64)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="checkpoint cache dir (default: a temporary directory)")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts seed (default 0)")
    ap.add_argument("--feed", choices=["argmax", "random"], default="argmax",
                    help="next decode input: the argmax of the logits (greedy, default) or a fixed random token "
                         "stream (the same for both engines; routing then varies from step to step the way a "
                         "trained model's does, while random-weight greedy decoding tends to repeat one token)")
    ap.add_argument("--copy-mib", type=int, default=512, help="size of the bandwidth copy in MiB (default 512)")
    ap.add_argument("--json", default=None, help="also write the results as JSON to this path")
    ap.add_argument("--profile", action="store_true",
                    help="after the benchmark, profile specmoe decode steps at the first batch size")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not args.batches or min(args.batches) < 1:
        ap.error("--batches needs positive integers")
    if args.steps < 1 or args.reps < 1 or args.prompt_len < 1:
        ap.error("--steps, --reps and --prompt-len must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_run = time.perf_counter()
    torch.manual_seed(args.seed)
    machine = {
        "cpu_model": cpu_model(), "os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
    }
    try:
        import transformers
        machine["transformers"] = transformers.__version__
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        print("transformers is needed as the baseline: pip install -e '.[test]'", file=sys.stderr)
        return 2
    print("# specmoe decode benchmark (moe-bench)")
    print()
    print(f"command: {shlex.join([sys.executable] + sys.argv)}")
    print(f"machine: {machine['cpu_model']}; os.cpu_count()={machine['os_cpu_count']}, "
          f"torch.get_num_threads()={machine['torch_threads']}; device cpu")
    print(f"versions: torch {machine['torch']}, transformers {machine['transformers']}, "
          f"python {machine['python']}")
    machine["loadavg_start"] = loadavg()
    print(f"load average at start (1/5/15 min): {machine['loadavg_start']}")
    print(f"settings: batches {args.batches}, prompt {args.prompt_len} tokens, {args.steps} decode steps x "
          f"{args.reps} reps (+1 warm-up), feed {args.feed}, dtype {args.dtype}, seed {args.seed}")

    tmp = None
    if args.out:
        ckpt = Path(args.out)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="moe-bench-")
        ckpt = Path(tmp.name)
    t0 = time.perf_counter()
    build_checkpoint(ckpt, args.seed)
    print(f"checkpoint: {ckpt} (moe-bench {MOE_BENCH}; ready in {time.perf_counter() - t0:.1f} s)")

    max_b = max(args.batches)
    max_seq = max(256, args.prompt_len + args.steps)
    spec = SpecmoeDecoder(ckpt, args.dtype, max_b, max_seq)
    hf = HFDecoder(ckpt, args.dtype)
    c = spec.engine.config
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(f"transformers: MixtralForCausalLM, attn_implementation={hf.attn_impl}, "
          f"experts_implementation={hf.experts_impl}, DynamicCache")
    bw = CopyBandwidth(args.copy_mib)
    print(f"bandwidth probe: {args.copy_mib} MiB dst.copy_(src), (read+write bytes)/time; "
          f"read-only sum: {bw.read_only() / 1e9:.1f} GB/s (informational)")
    print()

    rows = []
    load = OtherLoad()
    for B in args.batches:
        bw.measure()
        g = torch.Generator().manual_seed(args.seed * 1000 + B)
        prompts = torch.randint(0, c.vocab_size, (B, args.prompt_len), generator=g).tolist()
        feed = None
        if args.feed == "random":
            feed = torch.randint(0, c.vocab_size, (args.steps, B), generator=g).tolist()
        s_logits = spec.prefill(prompts)
        h_logits = hf.prefill(prompts)
        prefill_diff = (s_logits - h_logits).abs().max().item()

        # warm-up (untimed): specmoe records the routing of every step
        s_toks, snaps = spec.decode(args.steps, feed, routing=True)
        h_toks = hf.decode(args.steps, hf.fresh_cache(), feed)
        agree = sum(a == b for sa, ha in zip(s_toks, h_toks) for a, b in zip(sa, ha)) / (B * args.steps)

        times = {"specmoe": [], "transformers": []}
        load.start()
        for r in range(args.reps):
            order = ("specmoe", "transformers") if r % 2 == 0 else ("transformers", "specmoe")
            for name in order:
                if name == "specmoe":
                    t = time.perf_counter()
                    spec.decode(args.steps, feed)
                    times[name].append((time.perf_counter() - t) / args.steps)
                else:
                    cache = hf.fresh_cache()
                    t = time.perf_counter()
                    hf.decode(args.steps, cache, feed)
                    times[name].append((time.perf_counter() - t) / args.steps)
        other = load.stop()

        distinct = [sum(dx) / c.num_layers for dx, _ in snaps]                 # per step, mean over layers
        d_mean = sum(distinct) / len(distinct)
        # experts any step of the repetition touches: the weight working set a repetition streams
        d_union = (sum(tpe for _, tpe in snaps) > 0).sum(dim=1).float().mean().item()
        ctx = args.prompt_len + (args.steps + 1) / 2                          # mean context attended
        parts = step_bytes(c, B, d_mean, ctx, elem)
        bandwidth = median(bw.samples)
        roof_ms = parts["total"] / bandwidth * 1e3
        s_ms, h_ms = median(times["specmoe"]) * 1e3, median(times["transformers"]) * 1e3
        row = {
            "batch": B, "specmoe_ms": s_ms, "transformers_ms": h_ms,
            "specmoe_tok_s": B / s_ms * 1e3, "transformers_tok_s": B / h_ms * 1e3,
            "speedup": h_ms / s_ms, "roofline_ms": roof_ms, "specmoe_roofline_frac": roof_ms / s_ms,
            "transformers_roofline_frac": roof_ms / h_ms,
            "distinct_experts_per_layer": d_mean, "union_experts_per_layer_over_steps": d_union,
            "expected_distinct_experts_per_layer": expected_distinct(c.moe.num_experts, c.moe.top_k, B),
            "bytes": parts, "bandwidth_at_batch": bandwidth,
            "specmoe_ms_samples": [x * 1e3 for x in times["specmoe"]],
            "transformers_ms_samples": [x * 1e3 for x in times["transformers"]],
            "prefill_logits_max_abs_diff": prefill_diff, "greedy_token_agreement": agree,
            "other_load_cores": other[0] if other else None, "steal_cores": other[1] if other else None,
        }
        rows.append(row)
        print(f"batch {B:>3}: specmoe {s_ms:7.2f} ms/step [{min(row['specmoe_ms_samples']):.2f}.."
              f"{max(row['specmoe_ms_samples']):.2f}], transformers {h_ms:7.2f} ms/step "
              f"[{min(row['transformers_ms_samples']):.2f}..{max(row['transformers_ms_samples']):.2f}]; "
              f"distinct experts/layer {d_mean:.2f} (expected {row['expected_distinct_experts_per_layer']:.2f}, "
              f"{d_union:.1f} over all steps); "
              f"prefill logits max|diff| {prefill_diff:.1e}, argmax tokens agree {agree:.0%}"
              + (f"; other processes {other[0]:.2f} cores, steal {other[1]:.2f}" if other else ""), flush=True)

    machine["loadavg_end"] = loadavg()
    noisy = sorted({r["batch"] for r in rows for k in ("specmoe_ms_samples", "transformers_ms_samples")
                    if max(r[k]) > 1.5 * min(r[k])
                    or (r["other_load_cores"] or 0) + (r["steal_cores"] or 0) > 0.25})
    print(f"load average at end: {machine['loadavg_end']}")
    if noisy:
        print(f"WARNING: at batch {noisy} other processes took > 0.25 cores during the timed repetitions or the "
              "repetitions vary by > 1.5x; with torch using every core, any competing process slows both engines "
              "many-fold: rerun on a quiet machine before quoting these numbers")
    machine["noisy_batches"] = noisy
    bandwidth = median(bw.samples)
    for row in rows:   # final roofline with the bandwidth median over the whole run
        row["roofline_ms"] = row["bytes"]["total"] / bandwidth * 1e3
        row["specmoe_roofline_frac"] = row["roofline_ms"] / row["specmoe_ms"]
        row["transformers_roofline_frac"] = row["roofline_ms"] / row["transformers_ms"]

    print()
    print(f"Copy bandwidth: {bandwidth / 1e9:.2f} GB/s (median of {len(bw.samples)} copies of {args.copy_mib} MiB, "
          f"range {min(bw.samples) / 1e9:.2f}..{max(bw.samples) / 1e9:.2f}). Distinct experts: measured "
          f"(specmoe routing statistics, mean over steps and layers).")
    print()
    print("| batch | specmoe ms/step | transformers ms/step | specmoe tok/s | transformers tok/s | speedup "
          "| experts/layer | MB/step | roofline ms | specmoe % of roofline |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['specmoe_ms']:.2f} | {r['transformers_ms']:.2f} | {r['specmoe_tok_s']:.1f} "
              f"| {r['transformers_tok_s']:.1f} | {r['speedup']:.2f}x | {r['distinct_experts_per_layer']:.2f} "
              f"| {r['bytes']['total'] / 1e6:.1f} | {r['roofline_ms']:.2f} "
              f"| {100 * r['specmoe_roofline_frac']:.0f}% |")
    print()

    goals = None
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if b1 is not None:
        ok_s, ok_r = b1["speedup"] >= GOAL_SPEEDUP, b1["specmoe_roofline_frac"] >= GOAL_ROOFLINE
        goals = {"speedup": b1["speedup"], "speedup_met": ok_s,
                 "roofline_frac": b1["specmoe_roofline_frac"], "roofline_met": ok_r}
        print(f"Goal at batch 1, >= {GOAL_SPEEDUP:.0f}x transformers' tokens/s: {b1['speedup']:.2f}x -> "
              f"{'MET' if ok_s else 'NOT MET'}")
        print(f"Goal at batch 1, >= {GOAL_ROOFLINE:.0%} of the roofline: {b1['specmoe_roofline_frac']:.0%} -> "
              f"{'MET' if ok_r else 'NOT MET'}")

    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": [sys.executable] + sys.argv, "machine": machine, "settings": {
                "batches": args.batches, "steps": args.steps, "reps": args.reps, "prompt_len": args.prompt_len,
                "dtype": args.dtype, "seed": args.seed, "copy_mib": args.copy_mib, "feed": args.feed},
            "model": MOE_BENCH, "transformers_impl": {"attn": hf.attn_impl, "experts": hf.experts_impl},
            "bandwidth_bytes_per_s": bandwidth, "bandwidth_samples": bw.samples,
            "distinct_experts": "measured", "results": rows, "goals_batch1": goals}, indent=2))
        print(f"wrote {args.json}")

    if args.profile:
        B = args.batches[0]
        g = torch.Generator().manual_seed(args.seed * 1000 + B)
        spec.prefill(torch.randint(0, c.vocab_size, (B, args.prompt_len), generator=g).tolist())
        feed = (torch.randint(0, c.vocab_size, (args.steps, B), generator=g).tolist()
                if args.feed == "random" else None)
        spec.decode(args.steps, feed)
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            spec.decode(args.steps, feed)
        ka = prof.key_averages()
        print()
        print(f"torch.profiler, specmoe, batch {B}, {args.steps} decode steps (feed {args.feed}): "
              f"{sum(e.count for e in ka) / args.steps:.0f} aten op calls per step")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=25))

    del bw
    if tmp is not None:
        tmp.cleanup()
    print(f"\ntotal wall time {time.perf_counter() - t_run:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
