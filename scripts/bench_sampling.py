"""The sampling kernels' own cost per request row, on one CPU thread: the
top-p mask (kernels/sampling.py `nucleus`) against the stable sort of the
whole row it replaced (the same mask, checked here bit for bit), and a whole
sampled verification (probabilities + `verify_sampling_u`), by vocabulary
size and by the shape of the row.

    .venv/bin/python scripts/bench_sampling.py [--vocab 8192,32000,151936] [--reps 15] [--top-p 0.95]

Rows: "peaked" (logits of standard deviation 8: a nucleus of a few tokens,
what a trained model gives), "spread" (standard deviation 3: a nucleus of
tens to hundreds) and "flat" (standard deviation 1, like a random-weight
model's: a nucleus of most of the vocabulary). Each timing is the median of
--reps calls after a warm-up; the two masks alternate call by call.
"""

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import cpu_model  # noqa: E402

SHAPES = {"peaked": 8.0, "spread": 3.0, "flat": 1.0}


def stable_sort_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p mask by a stable sort of every row (the code nucleus replaced)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
    return ~torch.zeros_like(drop).scatter_(1, order, drop)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", default="8192,32000,151936")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--top-p", type=float, default=0.95)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from specmoe.kernels.sampling import nucleus, probs_from_logits
    from specmoe.kernels.verify import verify_sampling_u
    print("command:", " ".join(shlex.quote(x) for x in [".venv/bin/python", "scripts/bench_sampling.py",
                                                          *sys.argv[1:]]))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, torch {torch.__version__}, 1 thread; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"\nms per row, median of {a.reps}; top-p {a.top_p}")
    print(f"{'V':>7} {'row':<7}{'nucleus':>9}{'sort mask':>11}{'nucleus()':>11}{'ratio':>8}{'probs+verify':>14}")
    g = torch.Generator().manual_seed(0)
    for V in (int(v) for v in a.vocab.split(",")):
        for shape, scale in SHAPES.items():
            logits = torch.randn(1, V, generator=g) * scale
            probs = logits.softmax(dim=-1)
            want = stable_sort_mask(probs, a.top_p)
            if not torch.equal(nucleus(probs, a.top_p), want):
                raise SystemExit(f"nucleus differs from the stable sort's mask at V={V} {shape}")
            ts = {"sort": [], "nucleus": [], "verify": []}
            calls = {"sort": lambda: stable_sort_mask(probs, a.top_p), "nucleus": lambda: nucleus(probs, a.top_p),
                     "verify": lambda: verify_sampling_u(probs_from_logits(logits, 0.8, 0, a.top_p), [], None,
                                                         [0.5])}
            for f in calls.values():
                f()
            for _ in range(a.reps):
                for name, f in calls.items():
                    t0 = time.perf_counter()
                    f()
                    ts[name].append(time.perf_counter() - t0)
            m = {k: 1e3 * statistics.median(v) for k, v in ts.items()}
            print(f"{V:>7} {shape:<7}{int(want.sum()):>9}{m['sort']:>11.3f}{m['nucleus']:>11.3f}"
                  f"{m['sort'] / m['nucleus']:>7.1f}x{m['verify']:>14.3f}")


if __name__ == "__main__":
    main()
