"""`specmoe bench`: a load generator over gRPC. `concurrency` client threads
send prompts from a prompt set until `requests` have completed; every figure
is measured at the client (TTFT, TPOT, tokens/s) or summed from the per-step
speculation stats the stream carries (acceptance, chosen k).

    from specmoe.cluster.bench import run_bench
    r = run_bench("127.0.0.1:50051", concurrency=4, requests=32, max_tokens=64, speculation="auto")
    r["tokens_per_s"], r["tpot_p50_s"], r["acceptance"], r["mean_k"]

    # auto vs off at several concurrencies, interleaved, medians over rounds:
    runs = run_grid("127.0.0.1:50051", [1, 4, 16], ["auto", "off"], rounds=3, max_tokens=64)
    print(format_results(summarize(runs)))
"""

import json
import sys
import threading
import time
from pathlib import Path

from .client import Client, RequestError

# Python-flavoured prompts (the bundled model was trained on the standard library).
DEFAULT_PROMPTS = [
    'def read_config(path):\n    """Read a JSON file and return a dict."""\n',
    "class Stack:\n    def __init__(self):\n",
    "import os\nimport sys\n\n",
    "def main(argv=None):\n    parser = argparse.ArgumentParser(",
    "    for i, line in enumerate(lines):\n",
    'class Error(Exception):\n    """Base class for exceptions in this module."""\n',
    "    def __repr__(self):\n        return ",
    "    try:\n        import threading\n    except ImportError:\n",
]


def load_prompts(path: str | Path | None) -> list[str]:
    """One prompt per line of a text file, or a JSON list of strings, or JSONL of {"prompt": ...}."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    text = p.read_text()
    if p.suffix == ".json":
        prompts = json.loads(text)
    elif p.suffix == ".jsonl":
        prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts or not all(isinstance(x, str) and x for x in prompts):
        raise ValueError(f"prompt set {p}: expected non-empty prompt strings")
    return prompts


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


def run_bench(target: str, concurrency: int = 4, requests: int | None = None, max_tokens: int = 64,
              prompts: list[str] | None = None, speculation=None, temperature: float = 0.0, seed: int = 0,
              token: str | None = None, root_certificates=None, progress: bool = True,
              timeout: float | None = 600.0) -> dict:
    """Run the load and return the figures as a dict (see the module docstring)."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    prompts = prompts or list(DEFAULT_PROMPTS)
    total = requests if requests is not None else max(len(prompts), 2 * concurrency)
    results, errors = [], []
    lock = threading.Lock()
    next_i = iter(range(total))
    client = Client(target, token=token, root_certificates=root_certificates)
    t_start = time.perf_counter()
    stop_progress = threading.Event()

    def worker():
        while True:
            with lock:
                i = next(next_i, None)
            if i is None:
                return
            try:
                g = client.complete(prompts[i % len(prompts)], max_tokens=max_tokens, temperature=temperature,
                                    seed=seed + i, speculation=speculation, ignore_eos=True, timeout=timeout)
            except RequestError as e:
                with lock:
                    errors.append(f"{e.code.name}: {e.details}")
                continue
            with lock:
                results.append(g)

    def show():
        while not stop_progress.wait(0.5):
            _progress_line(results, errors, total, t_start)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    bar = threading.Thread(target=show, daemon=True) if progress else None
    for t in threads:
        t.start()
    if bar:
        bar.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    stop_progress.set()
    if bar:
        bar.join()
        _progress_line(results, errors, total, t_start)
        print(file=sys.stderr)
    client.close()
    tokens = sum(len(g.token_ids) for g in results)
    steps = sum(g.steps for g in results)
    drafted = sum(g.draft_tokens for g in results)
    accepted = sum(g.accepted_tokens for g in results)
    chosen = sum(g.chosen_k for g in results)
    ttft = [g.ttft_s for g in results if g.ttft_s is not None]
    tpot = [g.tpot_s for g in results if g.tpot_s is not None]
    return {
        "target": target, "concurrency": concurrency, "speculation": speculation, "max_tokens": max_tokens,
        "requests": len(results), "errors": errors, "wall_s": wall,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99),
        "draft_tokens": drafted, "accepted_tokens": accepted,
        "acceptance": accepted / drafted if drafted else None,   # accepted / drafted
        "mean_k": drafted / steps if steps else None,            # drafted per request-step
        "mean_k_chosen": chosen / steps if steps else None,      # chosen per request-step (drafter may give fewer)
        "tokens_per_step": tokens / steps if steps else None,    # committed per request-step (accepted + 1)
    }


def run_grid(target: str, concurrencies: list[int], speculations: list, rounds: int = 1, **kw) -> list[dict]:
    """run_bench for every (concurrency, speculation), the whole grid `rounds` times in turn,
    so that a drift of the machine hits every configuration alike. One dict per run, with "round"."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    runs = []
    for rnd in range(rounds):
        for conc in concurrencies:
            for spec in speculations:
                if kw.get("progress", True):
                    print(f"bench: round {rnd + 1}/{rounds}, concurrency {conc}, speculation "
                          f"{spec or 'server default'}", file=sys.stderr)
                runs.append({**run_bench(target, concurrency=conc, speculation=spec, **kw), "round": rnd})
    return runs


_MEDIAN_KEYS = ("tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "acceptance", "mean_k",
                "mean_k_chosen", "tokens_per_step", "wall_s")


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (concurrency, speculation): the median of each figure over its runs; counts summed."""
    import statistics
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["concurrency"], str(r["speculation"])), []).append(r)
    out = []
    for rs in groups.values():
        row = {k: rs[0][k] for k in ("target", "concurrency", "speculation", "max_tokens")}
        for k in _MEDIAN_KEYS:
            xs = [r[k] for r in rs if r.get(k) is not None]
            row[k] = statistics.median(xs) if xs else None
        for k in ("requests", "generated_tokens", "draft_tokens", "accepted_tokens"):
            row[k] = sum(r[k] for r in rs)
        row["errors"] = [e for r in rs for e in r["errors"]]
        row["runs"] = len(rs)
        out.append(row)
    return out


def _progress_line(results, errors, total, t_start) -> None:
    done = len(results) + len(errors)
    width = 30
    fill = int(width * done / total) if total else width
    toks = sum(len(g.token_ids) for g in results)
    dt = time.perf_counter() - t_start
    print(f"\rbench [{'#' * fill}{'.' * (width - fill)}] {done}/{total} requests, {toks} tokens, "
          f"{toks / dt if dt > 0 else 0:.1f} tok/s, {len(errors)} errors", end="", file=sys.stderr, flush=True)


def format_results(rows: list[dict]) -> str:
    """A table of run_bench results, one row per run."""
    def ms(x):
        return f"{x * 1e3:8.1f}" if x is not None else "       -"

    def f2(x):
        return f"{x:6.2f}" if x is not None else "     -"
    head = (f"{'conc':>4} {'spec':>6} {'reqs':>5} {'tok/s':>8} {'TTFT p50':>8} {'TTFT p99':>8} "
            f"{'TPOT p50':>8} {'TPOT p99':>8} {'accept':>6} {'mean k':>6} {'tok/step':>8}")
    lines = [head + "   (times in ms)"]
    for r in rows:
        lines.append(f"{r['concurrency']:>4} {str(r['speculation'] or 'server'):>6} {r['requests']:>5} "
                     f"{r['tokens_per_s']:8.1f} {ms(r['ttft_p50_s'])} {ms(r['ttft_p99_s'])} {ms(r['tpot_p50_s'])} "
                     f"{ms(r['tpot_p99_s'])} {f2(r['acceptance'])} {f2(r['mean_k'])} {f2(r['tokens_per_step']):>8}")
    return "\n".join(lines)
