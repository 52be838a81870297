"""The speculation controller's decisions on a SIMULATED steady load: decision
quality separated from timing noise.

    .venv/bin/python scripts/sim_controller.py --batch 1,4,16,64 --alpha 0.3,0.6,0.9 \\
        --decay 1.0,0.8 --noise 0.05,0.3 --seeds 3

No model runs. A step's "true" time comes from a linear model over the cost
model's own features (fixed, sequences, tokens up to the knee, distinct
experts, attention, all-to-all, tokens past the knee) whose coefficients and
knee are profiled on this machine from a real checkpoint (moe-bench by default, built if missing), with distinct experts
following a locality exponent (`--beta`) the controller has to learn, times
lognormal noise of `--noise` (0.05: a quiet machine; 0.3: heavy co-tenant
load). Drafts are accepted with probability alpha * decay**j at position j.
The controller (router/controller.py, unchanged) plans every step from its own
cost model, which starts from the true coefficients times `--bias` (a profile
that is off) and refits online from the noisy times, and learns acceptance
from the simulated verifications. Fixed k = 0..8 run the same load and noise.

A cell's figure is committed tokens per simulated second, averaged over
seeds; "auto / best" is against the best fixed k of the cell. What this does
not include: the controller's own time (measured in the real benchmark,
scripts/bench_controller.py) and whatever the linear model misses.
"""

import argparse
import json
import statistics
import sys
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_moe_bench import build_checkpoint  # noqa: E402


def true_coefficients(path):
    """(config, target coefficients, knee) profiled from a real runner of the checkpoint
    (64 sequences, so the profile's steps of 32-384 tokens run)."""
    import torch

    from specmoe.experts.runner import ModelRunner
    from specmoe.router.cost_model import CostModel
    torch.set_num_threads(1)
    runner = ModelRunner.from_pretrained(path, max_seqs=64, max_seq_len=512)
    cm = CostModel(runner.config)
    cm.profile(runner, None, budget_s=6.0)
    return runner.config, cm.c.copy(), cm.knee


def simulate(config, true_c, policy, batch, alpha, decay, *, steps, noise, seed, beta, bias, new_tokens, knee,
             draft_c=(5e-5, 0, 0, 0, 0)):
    """Committed tokens per simulated second and mean k of one policy ("auto" or "k=N")."""
    from specmoe.router.controller import Controller
    from specmoe.router.cost_model import CostModel
    from specmoe.router.params import SamplingParams
    from specmoe.router.request import Request
    from specmoe.router.scheduler import Scheduled
    rng = np.random.default_rng(seed)
    runner = types.SimpleNamespace(config=config, model=None)
    true_d = np.array(draft_c, dtype=float)
    ctl = Controller(runner, None, k_max=8, profile=False)
    cost = ctl.cost
    cost.knee = float(knee)
    truth = CostModel(config)               # the true model's features, at the true knee whatever the fit does
    truth.knee = float(knee)
    auto = policy == "auto"
    if auto:
        cost.c, cost.d = true_c * bias, true_d.copy()
        cost._prior_c, cost._prior_d = cost.c.copy(), cost.d.copy()
    E, K = cost.experts.E, config.moe.top_k if config.moe else 1
    cap = 8 if auto else int(policy[2:])
    next_id = iter(range(1 << 30))

    def new_request():
        rid = next(next_id)
        r = Request(rid, rid, [0] * 32, SamplingParams(), cap, None, auto=auto)
        r.num_cached, r.left = 32, new_tokens
        return r
    reqs = [new_request() for _ in range(batch)]
    tokens, seconds, ks = 0, 0.0, []
    for _ in range(steps):
        sched = [Scheduled(r, 1, r.k, False) for r in reqs]
        if auto:
            ctl.plan(sched, lambda s: True)
        results, q, drafts = [], [], []
        for s in sched:
            a = 0
            while a < s.k and rng.random() < alpha * decay ** a:
                a += 1
            results.append((s.req.id, s.k, a, True))
            q.append(1 + s.k)
            drafts.append(s.k)
            ks.append(s.k)
        x = truth.target_features(q, [r.num_cached for r in reqs])
        distinct = E * (1 - (1 - K / E) ** sum(v ** beta for v in q)) if E else 0.0
        x[3] = truth.moe_layers * distinct / truth.ep
        t = float(true_c @ x) * rng.lognormal(0.0, noise)
        td = float(true_d @ cost.draft_features(drafts)) if any(drafts) else 0.0
        if auto:
            ctl.observe(results, q, drafts, t, td, t + td, [distinct] * cost.moe_layers if E else None)
        seconds += t + td
        for i, (r, (_, _, a, _)) in enumerate(zip(reqs, results)):
            r.num_cached += a + 1
            r.left -= a + 1
            tokens += a + 1
            if r.left <= 0:
                if auto:
                    ctl.forget(r.id)
                reqs[i] = new_request()
    return tokens / seconds, float(np.mean(ks))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="profile this checkpoint for the true coefficients "
                                                       "(default: moe-bench, built under --out)")
    ap.add_argument("--out", default=".cache")
    ap.add_argument("--batch", default="1,4,16,64")
    ap.add_argument("--alpha", default="0.3,0.6,0.9")
    ap.add_argument("--decay", default="1.0,0.8")
    ap.add_argument("--noise", default="0.05,0.3", help="lognormal sigma of step times, one grid per value")
    ap.add_argument("--bias", default="1,1,1,1,1,1,1",
                    help="the controller's starting coefficients over the true ones (a profile that is off)")
    ap.add_argument("--beta", type=float, default=0.6, help="true routing locality exponent")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=0, help="tokens per request (0: max(32, 96 / batch))")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    path = a.checkpoint or build_checkpoint(Path(a.out) / "moe-bench", 0)
    config, true_c, knee = true_coefficients(path)
    bias = np.array([float(v) for v in a.bias.split(",")])
    if len(bias) != len(true_c):
        ap.error(f"--bias needs {len(true_c)} factors, got {len(bias)}")
    print("# specmoe controller decisions on a SIMULATED load (no model runs)\n")
    print(f"checkpoint {path}; true coefficients (us): " + ", ".join(f"{v * 1e6:.1f}" for v in true_c)
          + f"; knee {knee:.0f} tokens")
    print(f"bias {bias.tolist()}, beta {a.beta}, {a.steps} steps x {a.seeds} seeds per policy and cell\n")
    rows, summary = [], []
    for noise in [float(v) for v in a.noise.split(",")]:
        print(f"\n## noise sigma {noise}\n")
        print("| decay | batch | alpha | best fixed k | auto / best | auto / off | auto mean k |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        rb, ro = [], []
        for decay in [float(v) for v in a.decay.split(",")]:
            for batch in [int(v) for v in a.batch.split(",")]:
                for alpha in [float(v) for v in a.alpha.split(",")]:
                    nt = a.new_tokens or max(32, -(-96 // batch))

                    def mean_rate(policy):
                        runs = [simulate(config, true_c, policy, batch, alpha, decay, steps=a.steps, noise=noise,
                                         seed=s, beta=a.beta, bias=bias, new_tokens=nt, knee=knee)
                                for s in range(a.seeds)]
                        return statistics.mean(r[0] for r in runs), statistics.mean(r[1] for r in runs)
                    fixed = {k: mean_rate(f"k={k}")[0] for k in range(9)}
                    best_k = max(range(1, 9), key=fixed.get)
                    auto, mean_k = mean_rate("auto")
                    rb.append(auto / fixed[best_k])
                    ro.append(auto / fixed[0])
                    rows.append({"noise": noise, "decay": decay, "batch": batch, "alpha": alpha, "best_k": best_k,
                                 "auto_over_best": rb[-1], "auto_over_off": ro[-1], "auto_mean_k": mean_k})
                    print(f"| {decay} | {batch} | {alpha} | {best_k} | {rb[-1]:.3f} | {ro[-1]:.3f} | {mean_k:.2f} |",
                          flush=True)
        line = (f"noise {noise}: auto / best min {min(rb):.3f}, mean {statistics.mean(rb):.3f}, cells >= 0.97: "
                f"{sum(r >= 0.97 for r in rb)}/{len(rb)}; auto / off min {min(ro):.3f}, cells >= 0.98: "
                f"{sum(r >= 0.98 for r in ro)}/{len(ro)}")
        summary.append(line)
        print("\n" + line)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
