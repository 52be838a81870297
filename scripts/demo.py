#!/usr/bin/env python
"""The main job (`./scripts/demo`): serve a model over gRPC on a local Ray
instance with speculation "auto", send held-out prompts with the gRPC client
at several concurrencies, each against speculation "off" sent per request to
the same server, and print and plot auto vs off.

    .venv/bin/python scripts/demo.py [--model DIR] [--drafter ngram|draft_model] [--concurrency 1,4,16]
                                     [--rounds 5] [--max-tokens 64] [--png .cache/demo.png] [--quick]

The server is `specmoe serve` in a subprocess: 127.0.0.1, a gRPC port the OS
picks (read back from its log line), Ray's metrics port left to Ray (a free
one), no dashboard. Prompts are token windows of the Python standard-library
files scripts/train_tiny.py held out from training (eval_bundled.held_out_prompts).
Greedy; `ignore_eos` so every request makes max_tokens tokens. The grid is
interleaved (every concurrency x {auto, off} once per round, auto first in
even rounds, off first in odd ones) and each figure is the median over
rounds. The server and its Ray instance are shut down on every exit path
(normal end, error, Ctrl-C, SIGTERM).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"specmoe: serving (\S+) on ([0-9.]+):(\d+)")


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.environ.get("SPECMOE_MODEL") or None,
                    help="checkpoint directory with tokenizer.json (default: $SPECMOE_MODEL, else the bundled tiny MoE)")
    ap.add_argument("--drafter", choices=["ngram", "draft_model"], default="ngram",
                    help="what 'auto' drafts with: n-gram lookup (plain 'auto', the default) or a draft model")
    ap.add_argument("--draft-model", help="draft checkpoint for --drafter draft_model (default with the bundled "
                                          "model: the bundled tiny-draft)")
    ap.add_argument("--k", type=int, default=8, help="the most draft tokens the controller may choose per step")
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of client streams at once")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved repetitions of the grid (medians)")
    ap.add_argument("--requests", type=int, help="requests per run (default: max(prompts, 2 x concurrency))")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--png", default=str(ROOT / ".cache" / "demo.png"), help="plot file ('' for none)")
    ap.add_argument("--json", help="also write every run and the medians here")
    ap.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    ap.add_argument("--quick", action="store_true",
                    help="tiny settings for a smoke test: concurrency 1,4, 1 round, 4 prompts of 32 tokens, 8 new")
    a = ap.parse_args(argv)
    if a.quick:
        a.concurrency, a.rounds, a.prompts, a.prompt_tokens, a.max_tokens = "1,4", 1, 4, 32, 8
        a.requests = a.requests or 4
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    if a.model is not None and not Path(a.model).is_dir():
        ap.error(f"model {a.model}: not a checkpoint directory")
    if a.drafter == "draft_model" and a.model is not None and a.draft_model is None:
        ap.error(f"--drafter draft_model with model {a.model}: give --draft-model (a checkpoint with its vocabulary)")
    return a


def _speculation(a, bundled_draft: Path):
    """(engine speculation for the config, a line saying what it is)."""
    if a.drafter == "ngram":
        return ({"method": "ngram", "k": a.k, "auto": True},
                f"auto: the cost-model controller chooses k in 0..{a.k} per step and request, n-gram drafts")
    draft = a.draft_model or str(bundled_draft)
    if not Path(draft).is_dir():
        raise ValueError(f"draft model {draft}: not a checkpoint directory")
    return ({"method": "draft_model", "draft_model": draft, "k": a.k, "auto": True},
            f"auto: the cost-model controller chooses k in 0..{a.k} per step and request, "
            f"the draft model {os.path.relpath(draft, ROOT)} drafts")


def _prompts(model_dir: Path, n: int, prompt_tokens: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    from eval_bundled import held_out_prompts
    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ValueError(f"model {model_dir}: no tokenizer.json; the demo cuts its prompts from held-out "
                         f"Python text, so it needs the model's tokenizer")
    prompts = held_out_prompts(Tokenizer.from_file(str(tok_file)), n, prompt_tokens)
    if not prompts:
        raise ValueError("no held-out prompts: the Python standard library files were not found")
    return prompts


class Server:
    """`specmoe serve` in a subprocess, its log in a file; stop() ends it and every process under it."""

    def __init__(self, cfg: dict, workdir: Path):
        cfg_file, self.log_path = workdir / "serve.yaml", workdir / "serve.log"
        cfg_file.write_text(json.dumps(cfg, indent=1))   # JSON is YAML
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "specmoe.cluster.cli", "serve", "--config", str(cfg_file)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.target = self.line = None

    def wait_ready(self, timeout: float) -> None:
        """Until the log says where it serves (the port the OS picked); RuntimeError if it exits or times out."""
        self.target, self.line = self._wait(timeout)

    def _wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = SERVING.search(text)
            if m:
                return f"{m.group(2)}:{m.group(3)}", text[m.start():].splitlines()[0]
            if self.proc.poll() is not None:
                raise RuntimeError(f"specmoe serve exited with code {self.proc.returncode} before serving; "
                                   f"its log ({self.log_path}):\n{self._tail()}")
            time.sleep(0.25)
        raise RuntimeError(f"specmoe serve did not report serving within {timeout:.0f}s; its log:\n{self._tail()}")

    def _tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (a drain, then Ray shuts down); processes still alive afterwards are killed by pid."""
        import psutil
        try:
            tree = [psutil.Process(self.proc.pid)] + psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"demo: specmoe serve did not exit within {timeout:.0f}s of SIGTERM; killing it", file=sys.stderr)
        _, alive = psutil.wait_procs(tree, timeout=10)   # the serving process exits after the front one
        for p in alive:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=5)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        self._log.close()
        left = []
        for p in tree:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.pid)
            except psutil.NoSuchProcess:
                pass
        if left:
            print(f"demo: processes still running after shutdown: {left}", file=sys.stderr)


def _machine() -> str:
    import ray
    import torch
    from bench_forward import cpu_model
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu_model()}, {os.cpu_count()} cores, no GPU used (device cpu); load average {load:.1f} at start; "
            f"Python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}")


def _round_ratios(runs: list[dict], conc: int) -> list[float]:
    """tokens/s auto / off within each round (the two ran back to back, so machine drift mostly cancels)."""
    tps = {(r["round"], r["speculation"]): r["tokens_per_s"] for r in runs if r["concurrency"] == conc}
    return sorted(tps[(n, "auto")] / tps[(n, "off")] for n, s in tps if s == "off" and tps[(n, "off")]
                  and (n, "auto") in tps)


def _table(rows: list[dict], runs: list[dict]) -> str:
    """auto vs off per concurrency: medians over rounds, and auto / off with its range over rounds."""
    by = {(r["concurrency"], r["speculation"]): r for r in rows}
    concs = sorted({r["concurrency"] for r in rows})

    def f(x, fmt):
        return format(x, fmt) if x is not None else "-".rjust(int(fmt.split(".")[0]))
    out = [f"{'conc':>4} {'spec':>4} {'reqs':>5} {'tok/s':>8} {'TPOT p50 ms':>11} {'TTFT p50 ms':>11} "
           f"{'accept len':>10} {'mean k':>6} {'drafted':>7} {'accept':>6}",
           "  (accept len = committed tokens per request-step; mean k = draft length chosen per step; "
           "drafted = drafted per step; accept = accepted / drafted)"]
    for c in concs:
        for s in ("auto", "off"):
            r = by.get((c, s))
            if r is None:
                continue
            out.append(f"{c:>4} {s:>4} {r['requests']:>5} {r['tokens_per_s']:8.1f} "
                       f"{f(r['tpot_p50_s'] and r['tpot_p50_s'] * 1e3, '11.2f')} "
                       f"{f(r['ttft_p50_s'] and r['ttft_p50_s'] * 1e3, '11.1f')} "
                       f"{f(r['tokens_per_step'], '10.2f')} {f(r.get('mean_k_chosen'), '6.2f')} "
                       f"{f(r['mean_k'], '7.2f')} {f(r['acceptance'], '6.2f')}")
    out.append("")
    for c in concs:
        a, o = by.get((c, "auto")), by.get((c, "off"))
        if a and o and o["tokens_per_s"] and a["tpot_p50_s"] and o["tpot_p50_s"]:
            ratio = a["tokens_per_s"] / o["tokens_per_s"]
            per_round = _round_ratios(runs, c)
            lo, hi = (per_round[0], per_round[-1]) if per_round else (ratio, ratio)
            verdict = ("auto faster in every round" if lo > 1 else "auto SLOWER than off in every round" if hi < 1
                       else "no consistent difference: auto faster in some rounds, slower in others")
            out.append(f"concurrency {c:>2}: tokens/s auto / off = {ratio:.2f} (per round {lo:.2f}..{hi:.2f}), "
                       f"TPOT p50 auto / off = {a['tpot_p50_s'] / o['tpot_p50_s']:.2f}  -> {verdict}")
    return "\n".join(out)


def _plot(rows: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("demo: matplotlib is not installed (pip install -e '.[demo]'); no plot", file=sys.stderr)
        return None
    concs = sorted({r["concurrency"] for r in rows})
    by = {(r["concurrency"], r["speculation"]): r for r in rows}
    panels = [("tokens/s", lambda r: r["tokens_per_s"]),
              ("TPOT p50 (ms)", lambda r: r["tpot_p50_s"] * 1e3 if r["tpot_p50_s"] else None),
              ("acceptance length (tokens / step)", lambda r: r["tokens_per_step"]),
              ("mean k chosen", lambda r: r.get("mean_k_chosen"))]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    x = range(len(concs))
    for ax, (name, get) in zip(axes, panels):
        for j, (spec, color) in enumerate((("auto", "tab:blue"), ("off", "tab:gray"))):
            ys = [get(by[(c, spec)]) if (c, spec) in by else None for c in concs]
            ax.bar([i + (j - 0.5) * 0.38 for i in x], [y or 0.0 for y in ys], width=0.38, color=color, label=spec)
        ax.set_xticks(list(x), [str(c) for c in concs])
        ax.set_xlabel("concurrency")
        ax.set_title(name, fontsize=10)
    axes[0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    a = _args(argv)
    t_start = time.monotonic()

    def on_signal(signum, _frame):   # the first SIGINT/SIGTERM ends the run; later ones wait for the shutdown
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:   # ignored in a background job: the shell forwards it
        signal.signal(signal.SIGINT, on_signal)

    from specmoe.cluster.bench import run_bench, run_grid, summarize
    from specmoe.experts.checkpoint import bundled_model
    model_dir = Path(a.model) if a.model else Path(bundled_model("tiny-moe"))
    spec, spec_line = _speculation(a, Path(bundled_model("tiny-draft")))
    prompts = _prompts(model_dir, a.prompts, a.prompt_tokens)
    max_batch = max(max(a.concurrency), 1)
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "drain_timeout_s": 5.0},
           "engine": {"model": str(model_dir), "max_batch": max_batch,
                      "max_seq_len": a.prompt_tokens + a.max_tokens + a.k + 8, "speculation": spec},
           "ray": {"num_cpus": a.num_cpus, "metrics_export_port": None, "include_dashboard": False}}
    print("command:", " ".join(["./scripts/demo" if os.environ.get("SPECMOE_DEMO_SCRIPT") else
                                f"{sys.executable} {sys.argv[0]}", *(argv if argv is not None else sys.argv[1:])]))
    print("machine:", _machine())
    print(f"model: {model_dir}  (speculation {spec_line})")
    print(f"prompts: {len(prompts)} held-out windows of {a.prompt_tokens} tokens from the stdlib files "
          f"scripts/train_tiny.py held out; {a.max_tokens} new tokens each, greedy, ignore_eos")
    workdir = Path(tempfile.mkdtemp(prefix="specmoe-demo-"))
    server = None
    try:
        print(f"starting specmoe serve (local Ray, {a.num_cpus} CPUs, 127.0.0.1, free ports; log {workdir}/serve.log)",
              flush=True)
        t0 = time.monotonic()
        server = Server(cfg, workdir)
        server.wait_ready(a.startup_timeout)
        print(f"{server.line}  [ready in {time.monotonic() - t0:.1f}s]", flush=True)
        kw = dict(requests=a.requests, max_tokens=a.max_tokens, prompts=prompts, temperature=0.0, progress=False)
        for spec_name in ("auto", "off"):   # warm-up: first-call costs stay out of the figures
            run_bench(server.target, concurrency=2, speculation=spec_name,
                      **{**kw, "requests": 2, "max_tokens": min(a.max_tokens, 16)})
        n_runs = a.rounds * len(a.concurrency) * 2
        print(f"running {n_runs} runs: concurrency {a.concurrency} x speculation {{auto, off}} (per-request "
              f"override), {a.rounds} interleaved round(s)", flush=True)
        t0 = time.monotonic()
        runs = []
        for rnd in range(a.rounds):   # auto first in even rounds, off first in odd ones
            specs = ["auto", "off"] if rnd % 2 == 0 else ["off", "auto"]
            print(f"round {rnd + 1}/{a.rounds}", flush=True)
            runs += [{**r, "round": rnd} for r in run_grid(server.target, a.concurrency, specs, **kw)]
        bench_s = time.monotonic() - t0
    finally:
        if server is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):   # let the shutdown finish
                signal.signal(sig, signal.SIG_IGN)
            print("stopping the server and Ray ...", flush=True)
            server.stop()
    errors = [e for r in runs for e in r["errors"]]
    rows = summarize(runs)
    print(f"\nmedians over {a.rounds} interleaved round(s), measured at the client over loopback gRPC "
          f"({bench_s:.0f}s of load):\n")
    print(_table(rows, runs))
    if errors:
        print(f"\n{len(errors)} requests failed, e.g. {errors[0]}", file=sys.stderr)
    if a.png:
        title = (f"{model_dir.name}, {spec_line}; {len(prompts)} held-out prompts, {a.max_tokens} new tokens; "
                 f"medians of {a.rounds} round(s); {os.cpu_count()} CPU cores")
        png = _plot(rows, a.png, title)
        if png:
            print(f"\nplot: {png}")
    if a.json:
        Path(a.json).write_text(json.dumps({"summary": rows, "runs": runs}, indent=2))
        print(f"runs: {a.json}")
    if not errors:   # kept when something failed: it has the server's log
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"demo: done in {time.monotonic() - t_start:.0f}s")
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ndemo: interrupted; the server and Ray were shut down", file=sys.stderr)
        sys.exit(130)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        sys.exit(2)
