"""Expert-parallel decode step: time breakdown at EP 1/2/4, control-plane
overhead (the socket control plane vs plain Ray actor calls vs a Ray compiled
graph), and the all-to-all through plain torch.distributed vs deepspeed.comm.

    .venv/bin/python scripts/bench_ep.py [--model DIR] [--ep 1,2,4] [--batch 1,4,16,64]
        [--steps 20] [--prompt-len 32] [--control socket,actor,compiled] [--comm torch,deepspeed]
        [--cpus-per-worker 0.5] [--rows argmax,full,sampled] [--json PATH]

--model defaults to moe-bench (scripts/make_moe_bench.py; built into
.cache/moe-bench when missing). Every configuration (EP degree x control x
comm) is an EPRunner started once, all at the same time on one local Ray; the
embedded single-process ModelRunner is the baseline. For each batch size B every
configuration prefills B random prompts of --prompt-len tokens (untimed), then
the timed decode steps run INTERLEAVED: step i of every configuration before
step i + 1 of any, so machine noise hits all alike. Each step feeds one random
token per sequence through runner.run as the engine calls it, once per
--rows mode (each on its own slots): "argmax" as for greedy requests (only
each row's argmax comes back from the workers, 4 bytes), "full" as for
sampled ones verified on the router (the whole logits row, 4 V bytes, then
the router's probabilities and verification, as the engine does for a draft
model's drafts), "sampled" as for sampled ones with one-hot or no drafts
(verified on their workers on uniforms the plan carries; (accepted, token)
comes back), and reads:

- step: the router's wall time of run();
- verify: the router's own sampling work around it: for "full", the
  probabilities and the verification of every row; for "sampled", drawing the
  uniforms from each sequence's generator (temperature 0.8, top-p 0.95);
- control plane: step minus the slowest worker's own time (plan encode/send,
  results back and decode, logits assembly), and the router's own share of it
  (encode, decode, assembly, measurements; the rest is Ray transport);
- on the slowest worker: all-to-all (dispatch + combine, the permutations
  around the three collectives included; "(wait)" is its first collective,
  the few-byte counts exchange, which mostly measures waiting for the other
  ranks to arrive), experts (grouped expert compute
  between dispatch and combine), and attention + dense (the rest: embedding,
  attention, norms, router, LM head).

Figures are medians over steps. On a CPU box the ranks share the cores, so EP
does not speed anything up here; the point is the breakdown and the overheads.
A compiled graph's idle workers spin on their channels (a share of a core
each), so on a small box they slow every other configuration of the same run
too: measure `--control socket` alone as well.
"""

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import cpu_model  # noqa: E402


def med(xs):
    return statistics.median(xs) if xs else float("nan")


TEMPERATURE, TOP_P = 0.8, 0.95


class Config:
    def __init__(self, name, runner, embedded=False, mode="full"):
        self.name, self.runner, self.embedded = name, runner, embedded
        self.mode = mode            # argmax (greedy), full (sampled, verified here), sampled (on the workers)
        self.rows = {}         # batch -> list of per-step dicts

    def prefill(self, prompts):
        from specmoe.experts.batch import Chunk
        self.slots = [self.runner.cache.allocate() for _ in prompts]
        for s, p in zip(self.slots, prompts):
            self.runner.run([Chunk(s, 0, p)])
        self.pos = len(prompts[0])
        self.gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]

    def release(self):
        for s in self.slots:
            self.runner.cache.free(s)

    def step(self, tokens, B):
        from specmoe.experts.batch import Chunk
        from specmoe.kernels.sampling import probs_from_logits
        from specmoe.kernels.verify import SampleSpec, draw_uniforms, verify_sampling_u
        chunks = [Chunk(s, self.pos, [t]) for s, t in zip(self.slots, tokens)]
        sample, v0 = None, time.perf_counter()
        if self.mode == "sampled":
            sample = [SampleSpec(TEMPERATURE, 0, TOP_P, draw_uniforms(0, g)) for g in self.gens]
        t0 = time.perf_counter()
        out = self.runner.run(chunks, routing=True, full=[self.mode == "full"] * B, sample=sample)
        dt = time.perf_counter() - t0
        if self.mode == "full":
            for i, g in enumerate(self.gens):
                verify_sampling_u(probs_from_logits(out.logits[i:i + 1], TEMPERATURE, 0, TOP_P), [], None,
                                  draw_uniforms(0, g))
        self.pos += 1
        row = {"step_s": dt, "verify_s": time.perf_counter() - v0 - dt}
        x = out.extra
        if x:
            r = max(range(x["ep"]), key=lambda i: x["worker_s"][i])      # the slowest rank: the critical path
            row.update(control_s=x["control_plane_s"], router_s=x["control_router_s"], a2a_s=x["a2a_s"][r],
                       sync_s=x["a2a_sync_s"][r], expert_s=x["expert_s"][r],
                       attn_dense_s=x["worker_s"][r] - x["a2a_s"][r] - x["expert_s"][r],
                       a2a_bytes=sum(x["a2a_bytes"]),
                       distinct=med([sum(r_[li] for r_ in x["distinct_experts_per_rank"])
                                     for li in range(len(x["distinct_experts_per_rank"][0]))]))
        self.rows.setdefault(B, []).append(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / ".cache" / "moe-bench"))
    ap.add_argument("--ep", default="1,2,4")
    ap.add_argument("--batch", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--control", default="socket,actor,compiled")
    ap.add_argument("--comm", default="torch,deepspeed")
    ap.add_argument("--cpus-per-worker", type=float, default=0.5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="argmax,full,sampled",
                    help="per sequence: argmax (greedy), full (sampled, rows back), sampled (verified on the workers)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    eps = [int(x) for x in a.ep.split(",")]
    batches = [int(x) for x in a.batch.split(",")]
    controls, comms, modes = a.control.split(","), a.comm.split(","), a.rows.split(",")
    if not modes or set(modes) - {"argmax", "full", "sampled"}:
        ap.error(f"--rows {a.rows!r}: expected a list of argmax, full, sampled")
    if "deepspeed" in comms:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            print("deepspeed not installed (pip install 'specmoe[deepspeed]'): comparing torch only")
            comms = [c for c in comms if c != "deepspeed"]
    model = Path(a.model)
    if not (model / "config.json").exists():
        from make_moe_bench import build_checkpoint
        build_checkpoint(model)

    import ray

    from specmoe.experts.ep_runner import EPRunner
    from specmoe.experts.runner import ModelRunner
    max_seqs = max(batches) * len(modes)        # each mode on its own slots
    max_len = a.prompt_len + a.warmup + a.steps + 1
    print("command:", " ".join(shlex.quote(x) for x in [".venv/bin/python", "scripts/bench_ep.py", *sys.argv[1:]]))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, device {a.device}, torch {torch.__version__}, "
          f"ray {ray.__version__}; load average {os.getloadavg()[0]:.2f}")
    # the comm comparison needs an all-to-all (EP > 1); one control plane is enough for it
    setups = [(ep, control, comm) for ep in eps for control in controls for comm in comms
              if comm == "torch" or (ep > 1 and control == controls[0])]
    workers = sum(ep for ep, _, _ in setups)
    ray.init(address="local", num_cpus=int(workers * a.cpus_per_worker) + 2,
             include_dashboard=False, logging_level="ERROR")
    emb = ModelRunner.from_pretrained(model, device=a.device, max_seqs=max_seqs, max_seq_len=max_len)
    configs = [Config(f"embedded {m}", emb, embedded=True, mode=m) for m in modes]
    try:
        for ep, control, comm in setups:
            r = EPRunner.from_pretrained(model, ep=ep, device=a.device, max_seqs=max_seqs, max_seq_len=max_len,
                                         num_cpus_per_worker=a.cpus_per_worker, control=control, comm=comm)
            name = f"EP={ep} {control}" + (f" {comm}" if comm != "torch" else "")
            configs += [Config(f"{name} {m}", r, mode=m) for m in modes]
        V = configs[0].runner.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for B in batches:
            prompts = torch.randint(0, V, (B, a.prompt_len), generator=g).tolist()
            for c in configs:
                c.prefill(prompts)
            for i in range(a.warmup + a.steps):
                toks = torch.randint(0, V, (B,), generator=g).tolist()
                for c in configs:
                    c.step(toks, B)
                    if i < a.warmup:
                        c.rows[B].pop()
            for c in configs:
                c.release()
        report(configs, batches)
        print(f"load average at the end (this run's processes included): {os.getloadavg()[0]:.2f}")
        if a.json:
            Path(a.json).write_text(json.dumps({c.name: c.rows for c in configs}, indent=1))
    finally:
        for c in configs:
            getattr(c.runner, "close", lambda: None)()
        ray.shutdown()


def p90(xs):
    return sorted(xs)[int(0.9 * len(xs))] if xs else float("nan")


def fmt(xs):
    """'median (p90)' in ms."""
    return f"{1e3 * med(xs):.3f} ({1e3 * p90(xs):.3f})"


def report(configs, batches):
    print("\nmedian ms per decode step (slowest rank's breakdown); a2a KiB = all-to-all bytes over all ranks")
    print(f"{'config':<30}{'B':>4}{'step':>9}{'ctrl':>8}{'a2a':>8}{'(wait)':>8}{'experts':>9}{'attn+dense':>11}"
          f"{'a2a KiB':>9}{'distinct':>9}{'x embedded':>11}{'verify':>9}")
    for B in batches:
        base = {c.mode: med([r["step_s"] for r in c.rows[B]]) for c in configs if c.embedded}
        for c in configs:
            rows = c.rows[B]
            f = {k: med([r[k] for r in rows]) for k in rows[0]}
            ms = lambda k: f"{1e3 * f[k]:.2f}" if k in f else "-"  # noqa: E731
            kib = f"{f['a2a_bytes'] / 1024:.0f}" if "a2a_bytes" in f else "-"
            dist = f"{f['distinct']:.1f}" if "distinct" in f else "-"
            print(f"{c.name:<30}{B:>4}{ms('step_s'):>9}{ms('control_s'):>8}{ms('a2a_s'):>8}{ms('sync_s'):>8}"
                  f"{ms('expert_s'):>9}"
                  f"{ms('attn_dense_s'):>11}{kib:>9}{dist:>9}{f['step_s'] / base[c.mode]:>11.2f}{ms('verify_s'):>9}")
    print("\ncontrol plane per step, ms: median (p90) over all batches, then per batch (goal <= 1 ms median):")
    for c in configs:
        if c.embedded:
            continue
        cp = [r["control_s"] for B in batches for r in c.rows[B]]
        own = [r["router_s"] for B in batches for r in c.rows[B]]
        per_b = ", ".join(f"B={B} {fmt([r['control_s'] for r in c.rows[B]])}" for B in batches)
        print(f"  {c.name:<24}{fmt(cp)}; router's own work {1e3 * med(own):.3f}, "
              f"transport {1e3 * med([x - y for x, y in zip(cp, own)]):.3f}; {per_b}")
    print("\ncontrol plane + the router's sampling work (verify), per step, ms: median (p90) per batch:")
    for c in configs:
        if c.embedded or c.mode == "argmax":
            continue
        print(f"  {c.name:<24}" + ", ".join(
            f"B={B} {fmt([r['control_s'] + r['verify_s'] for r in c.rows[B]])}" for B in batches))
    ds = [c for c in configs if " deepspeed " in c.name]
    for d in ds:
        ref = next(c for c in configs if c.name == d.name.replace(" deepspeed", ""))
        print(f"all-to-all time {d.name} / {ref.name}: " + ", ".join(
            f"B={B} {med([r['a2a_s'] for r in d.rows[B]]) / med([r['a2a_s'] for r in ref.rows[B]]):.2f}"
            for B in batches))


if __name__ == "__main__":
    main()
