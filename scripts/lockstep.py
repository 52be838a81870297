"""Step-interleaved timing of several engines on one machine.

Benchmarks that compare policies ("off", "auto", k = 1..8) used to run each
policy's whole generation in turn; on a VM whose speed drifts by up to 1.5x
from one minute to the next, a policy's figure then carries the speed of the
seconds it happened to run in. Here every engine advances one step in turn
(the order rotated each round, so none always follows another), and each
engine's time is the sum of its own `Engine.step()` calls: drift over
seconds reaches every policy alike. Each engine must own its runner (KV
cache slots), since all of them hold requests at once; `own_runner` makes one
over the same weights.
"""

import statistics
import time


class Clock:
    """What one engine's generation measured on its own time: the sum of its steps."""

    def __init__(self, engine, keep_steps: bool = False):
        self.engine = engine
        self.seconds = 0.0
        self.tokens = 0
        self.first, self.last, self.count = {}, {}, {}     # request index -> own-clock time, tokens
        self.phase_s, self.phase_tokens = [], []
        self._k0 = dict(engine.telemetry.k_histogram)
        # keep_steps: one record per step (`step_record`), for a per-step log of where the time went
        self.steps: list[dict] | None = [] if keep_steps else None

    def record(self, key, n: int, at: float) -> None:
        """n tokens of request `key` committed at `at` seconds (this clock's time)."""
        self.first.setdefault(key, at)
        self.last[key] = at
        self.count[key] = self.count.get(key, 0) + n
        self.tokens += n

    def tpot_ms(self) -> float:
        """Median over requests of the time per output token after the first."""
        xs = [(self.last[i] - self.first[i]) / (self.count[i] - 1) * 1e3 for i in self.count if self.count[i] > 1]
        return statistics.median(xs) if xs else float("nan")

    def k_histogram(self) -> dict:
        """Draft length -> request-steps that drafted it, over this generation."""
        return {k: v - self._k0.get(k, 0) for k, v in sorted(self.engine.telemetry.k_histogram.items())
                if v > self._k0.get(k, 0)}

    def mean_k(self) -> float:
        """Mean draft length per request-step over this generation."""
        hist = self.k_histogram()
        n = sum(hist.values())
        return sum(k * v for k, v in hist.items()) / n if n else 0.0


def generation(clock: Clock, phases):
    """Runs `phases` [(prompts, params, before or None)] back to back on the
    clock's engine, yielding after every step; `before()` runs (untimed) as a
    phase starts. Requests are numbered per phase from 0 (their `index`)."""
    eng = clock.engine
    for n, (prompts, params, before) in enumerate(phases):
        if before is not None:
            before()
        for i, p in enumerate(prompts):
            eng.add_request(p, params, i)
        t_phase, tok_phase = clock.seconds, clock.tokens
        while eng.has_work:
            t0 = time.perf_counter()
            events = eng.step()
            dt = time.perf_counter() - t0
            clock.seconds += dt
            for _, chunk in events:
                if chunk.token_ids:
                    clock.record((n, chunk.index), len(chunk.token_ids), clock.seconds)
            if clock.steps is not None:
                clock.steps.append(step_record(eng, n, dt))
            yield
        clock.phase_s.append(clock.seconds - t_phase)
        clock.phase_tokens.append(clock.tokens - tok_phase)


def step_record(eng, phase: int, seconds: float) -> dict:
    """One step as the engine reported it: phase, requests in it, sampled ones
    (prompt parts are not), their draft lengths, drafts accepted, tokens
    committed, its time on this clock and the engine's own split of it
    (schedule, plan, propose, forward, verify); for "auto" also the measured goodput
    the next plan prices with (tokens/s) and the sequence count it is of, the
    price of a next step at uniform k and the global acceptance curve."""
    r = eng.last_step
    out = {"phase": phase, "requests": r.num_requests, "sampled": len(r.k), "k": list(r.k),
           "accepted": r.accepted_tokens, "committed": r.committed_tokens, "ms": round(seconds * 1e3, 3),
           "phase_ms": {p: round(v * 1e3, 3) for p, v in r.phase_s.items()}}
    ctl = getattr(eng, "controller", None)
    if ctl is not None:
        out.update(goodput=round(ctl.goodput, 1), goodput_seqs=ctl.goodput_seqs, quiet=bool(ctl.quiet),
                   fallback=bool(ctl.fallback), priced_ms=priced_uniform(ctl, eng.scheduler.running),
                   curve=[round(float(a), 3) for a in ctl.acceptance.global_curve[:8]],
                   rates=mean_rates(ctl, eng.scheduler.running))
    return out


PRICED_KS = (0, 1, 2, 3, 4, 8)


def mean_rates(ctl, running) -> list:
    """The running requests' conditional acceptance per position as the plan reads them (with the
    exploration bonus), averaged over the requests (proposal kinds not looked up)."""
    if not running:
        return []
    rs = ctl.acceptance.rates([r.id for r in running], ctl.explore)
    return [round(sum(col) / len(rs), 3) for col in zip(*rs)]


def priced_uniform(ctl, running) -> dict:
    """The cost model's price (ms) of a next step in which every running request decodes with k drafts,
    for k in PRICED_KS: what the plan weighs, to set beside the steps fixed-k engines measured. Runs after
    the step's clock stopped."""
    ctx = [r.num_cached for r in running]
    if not ctx:
        return {}
    out = {}
    for k in PRICED_KS:
        x = ctl.cost.target_features([1 + k] * len(ctx), ctx)
        z = ctl.cost.draft_features([k] * len(ctx))
        out[k] = round(ctl.cost.predict(x, z) * 1e3, 2)
    return out


def step_summary(steps: list[dict]) -> list[tuple]:
    """Steps grouped by how many requests they sampled (1, 2-3, 4-7, ... powers of two):
    (group label, steps, mean ms a step, committed tokens/s, mean k per sampled request)."""
    groups: dict[int, list[dict]] = {}
    for s in steps:
        if s["sampled"]:
            groups.setdefault(s["sampled"].bit_length(), []).append(s)
    out = []
    for b, xs in sorted(groups.items()):
        lo, hi = 1 << (b - 1), (1 << b) - 1
        ms = sum(x["ms"] for x in xs)
        ks = [k for x in xs for k in x["k"]]
        out.append((f"{lo}" if lo == hi else f"{lo}-{hi}", len(xs), ms / len(xs),
                    sum(x["committed"] for x in xs) / ms * 1e3, sum(ks) / len(ks)))
    return out


def lockstep(engines: dict, phases, start: int = 0, keep_steps: bool = False) -> dict:
    """Every engine of {name: Engine} runs `phases` (see `generation`; a dict
    {name: phases} where they differ, e.g. in their `before`), one step each
    in turn, round r in the order rotated by start + r; {name: Clock}
    (keep_steps: each Clock keeps a record per step)."""
    clocks = {name: Clock(e, keep_steps) for name, e in engines.items()}
    live = [(name, generation(c, phases[name] if isinstance(phases, dict) else phases))
            for name, c in clocks.items()]
    r = start
    while live:
        at = r % len(live)
        done = []
        for name, g in live[at:] + live[:at]:
            try:
                next(g)
            except StopIteration:
                done.append(name)
        live = [x for x in live if x[0] not in done]
        r += 1
    return clocks


def own_runner(runner):
    """A ModelRunner over `runner`'s weights with a KV cache of its own (same
    slots and capacity). Runners that hold remote workers (EP) cannot be
    copied this way: None."""
    from specmoe.experts.runner import ModelRunner
    if type(runner) is not ModelRunner:
        return None
    return ModelRunner(runner.model, runner.checkpoint, runner.cache.num_slots, runner.cache.capacity)
