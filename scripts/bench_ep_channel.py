#!/usr/bin/env python
"""The EP control channel alone: one step's round trip (plan out, result and
logits rows back) between the router's RouterChannel and a worker process on
the same node, with the rows through the worker's shared-memory region
("shared") and through the Unix socket ("socket", the region turned off).
Both links run interleaved in one run; the worker's step does no work, so
this is the transport that bench_ep.py's control-plane figure contains.

    .venv/bin/python scripts/bench_ep_channel.py [--rows 16,64,512] [--vocab 4096] [--steps 100] [--reps 5]
"""

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import cpu_model, loadavg  # noqa: E402
from bench_spec import git_revision  # noqa: E402


def _worker(address, token, shm_bytes, rows, vocab):
    import torch

    from specmoe.experts import ep_channel as ch
    torch.set_num_threads(1)
    sock, region = ch.connect(address, token, 0, 10.0, True, shm_bytes=shm_bytes)
    logits = torch.randn(rows, vocab).numpy()
    ch.serve(sock, lambda plan: (bytes(48), logits), region)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="16,64,512", help="logits rows per step (comma-separated)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=100, help="round trips per repetition")
    ap.add_argument("--reps", type=int, default=5, help="repetitions after one warm-up, links interleaved")
    a = ap.parse_args()
    import torch

    from specmoe.experts import ep_channel as ch
    print("command:", " ".join([sys.executable, *sys.argv]))
    print(f"machine: {cpu_model()}, load average {loadavg()}; commit {git_revision()}; vocab {a.vocab}, float32")
    ctx = mp.get_context("spawn")
    print("| rows | MiB | shared median ms (p90) | socket median ms (p90) | socket / shared |")
    print("|---:|---:|---:|---:|---:|")
    for rows in (int(r) for r in a.rows.split(",")):
        links = {}
        for name, shm in (("shared", ch.SHM_BYTES), ("socket", 0)):
            router = ch.RouterChannel("127.0.0.1", 1)
            proc = ctx.Process(target=_worker, args=(router.address, router.token, shm, rows, a.vocab), daemon=True)
            proc.start()
            router.accept(60.0)
            links[name] = (router, proc)
        assert (links["shared"][0].shared[0] is not None) and links["socket"][0].shared[0] is None
        out = torch.empty(rows, a.vocab)
        times = {name: [] for name in links}
        for rep in range(a.reps + 1):
            for name, (router, _) in (links.items() if rep % 2 else reversed(links.items())):
                for _ in range(a.steps):
                    t0 = time.perf_counter()
                    router.broadcast(bytes(64))
                    router.gather(out, [[(0, rows)]], 10.0, 1.0, lambda: None)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
        for router, proc in links.values():
            router.close()
            proc.join(5.0)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        p90 = {n: sorted(v)[int(0.9 * len(v))] * 1e3 for n, v in times.items()}
        print(f"| {rows} | {rows * a.vocab * 4 / 2**20:.2f} | {med['shared']:.3f} ({p90['shared']:.3f}) | "
              f"{med['socket']:.3f} ({p90['socket']:.3f}) | {med['socket'] / med['shared']:.2f}x |")
    print(f"load average at the end: {loadavg()}")


if __name__ == "__main__":
    main()
