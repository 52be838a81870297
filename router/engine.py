"""The embedded engine: continuous batching with speculative decoding in one
process.

Ownership: the Engine owns requests (tokens, cached length, generator,
stats); the Scheduler decides who runs each step and with how many tokens;
the Proposer owns draft state; the ModelRunner owns weights and KV tensors
and is told each step which chunk of which slot to append. One step:

    schedule -> propose drafts -> one target forward over [new tokens | drafts]
    per request -> verify (greedy or rejection sampling) -> commit accepted +
    recovered/bonus token, check stop conditions -> stream
"""

import gc
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import drafter
from ..drafter.base import DraftInput, Proposal, Proposer
from ..experts.batch import Chunk
from ..experts.checkpoint import bundled_model
from ..experts.runner import ModelRunner
from ..kernels import linear as few_rows
from ..kernels.sampling import probs_from_logits
from ..kernels.verify import SampleSpec, accept_greedy, draw_uniforms, verify_sampling_u
from .controller import Controller
from .params import SamplingParams, SpeculationConfig, parse_speculation
from .request import Completion, CompletionStats, Request, StreamChunk
from .scheduler import Scheduled, Scheduler
from .telemetry import StepReport, Telemetry

__all__ = ["Engine", "SamplingParams", "Completion", "CompletionStats", "StreamChunk"]


def build_proposer(spec: SpeculationConfig, runner: ModelRunner, max_seqs: int, max_seq_len: int) -> Proposer | None:
    """The drafter a speculation config names (never a synthetic one)."""
    if not spec.enabled:
        return None
    if spec.method == "ngram":
        return drafter.NgramProposer(min_n=spec.min_n, max_n=spec.max_n)
    if spec.method == "draft_model":
        m = runner.model
        return drafter.draft_model_proposer(runner.config, spec.draft_model, m.device, m.dtype, max_seqs, max_seq_len,
                                            min_confidence=spec.min_confidence)
    return drafter.layer_skip_proposer(runner, spec.layers, max_seqs, max_seq_len, min_confidence=spec.min_confidence)


def _freeze_startup_objects() -> None:
    """Move what exists once an engine is built (torch, the model, the
    tokenizer: ~170k objects) out of the cyclic collector's reach. A full
    collection over them took ~96 ms and came, at a moment set by allocation
    counts, inside some step (one every few hundred steps of a batch-1 auto
    engine: 60% of its controller time in the run that found it). Garbage is
    collected first; objects made later are collected as usual. What servers
    do after start-up (gc.freeze)."""
    gc.collect()
    gc.freeze()


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer=None, speculation=None, proposer: Proposer | None = None,
                 max_tokens_per_step: int = 4096, kv_budget_tokens: int | None = None):
        """`proposer` overrides the one `speculation` names: the way Python
        benchmarks plug in a synthetic drafter (the serving API cannot)."""
        self.runner, self.tokenizer = runner, tokenizer
        self.config = runner.config
        ckpt = runner.checkpoint
        self.eos_token_ids = set(ckpt.eos_token_ids if ckpt else self.config.eos_token_ids)
        cache = runner.cache
        if proposer is not None:   # only k (and auto) are read from `speculation` then
            spec = speculation if isinstance(speculation, dict) else {}
            self.speculation = SpeculationConfig(k=int(spec.get("k", 4)), auto=bool(spec.get("auto", False)))
            self.proposer, self.method = proposer, proposer.name
        else:
            self.speculation = parse_speculation(speculation)
            self.proposer = build_proposer(self.speculation, runner, cache.num_slots, cache.capacity)
            self.method = self.speculation.method
        self.scheduler = Scheduler(cache.num_slots, cache.capacity, max_tokens_per_step,
                                   kv_budget_tokens or cache.num_slots * cache.capacity)
        self._ids = itertools.count()
        self._requests: dict[int, Request] = {}
        self.telemetry = Telemetry()
        self.last_step = StepReport()
        self.controller: Controller | None = None
        m = self.config.moe
        itemsize = getattr(getattr(getattr(runner, "model", None), "dtype", None), "itemsize", 4)
        self._expert_bytes = 3 * self.config.hidden_size * m.expert_ffn * itemsize if m else 0
        if self.speculation.auto and self.proposer is not None:
            self.controller = Controller(runner, self.proposer, k_max=self.speculation.k)
        _freeze_startup_objects()

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                        max_batch: int = 8, max_seq_len: int = 2048, speculation=None, ep: int = 1,
                        ray_address: str | None = None, ep_options: dict | None = None,
                        few_row_linears: int | None = few_rows.DEFAULT_ROWS, **kwargs) -> "Engine":
        """Load a local Hugging Face checkpoint directory (see experts.checkpoint);
        without a path, the bundled tiny MoE. speculation: "off", "auto", or e.g.
        {"method": "ngram", "k": 4}. ep > 1 (or a ray_address) runs the model
        expert-parallel over `ep` Ray workers; ep=1 without Ray is the embedded mode.
        ep_options go to EPRunner (placement_strategy, control="compiled", expert_load, ...).
        few_row_linears: on CPU in float32, a dense weight times at most this many
        rows goes through a prepared copy of it, and a routed expert given two
        rows or more through a packed copy of that expert (faster, up to three
        times the dense weights' memory and twice the experts'; kernels/linear.py);
        1 keeps only the one-row transposed copies, 0 makes no copies. It is set in
        every process that runs a forward (this one, each EP worker); None keeps
        this process's setting."""
        if path is None:
            path = bundled_model("tiny-moe")
        if not isinstance(ep, int) or ep < 1:
            raise ValueError(f"ep must be an integer >= 1, got {ep!r}")
        if few_row_linears is not None:
            few_rows.check_rows(few_row_linears)
        if ep > 1 or ray_address is not None:
            from ..experts.ep_runner import EPRunner
            runner = EPRunner.from_pretrained(path, ep=ep, ray_address=ray_address, device=device, dtype=dtype,
                                              max_seqs=max_batch, max_seq_len=max_seq_len,
                                              few_row_linears=few_row_linears, **(ep_options or {}))
        elif ep_options:
            raise ValueError("ep_options need expert parallelism (ep > 1 or a ray_address)")
        else:
            runner = ModelRunner.from_pretrained(path, device=device, dtype=dtype, max_seqs=max_batch,
                                                 max_seq_len=max_seq_len, few_row_linears=few_row_linears)
        tok = None
        tok_file = Path(path) / "tokenizer.json"
        if tok_file.exists():
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tok_file))
        return cls(runner, tok, speculation=speculation, **kwargs)

    # ---- input / output -------------------------------------------------------------------------------------

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer.json in the checkpoint; pass token ids instead")
            ids = self.tokenizer.encode(prompt).ids
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        V = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary 0..{V - 1}")
        return ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _request_k(self, params: SamplingParams) -> tuple[int, bool]:
        """(draft tokens per step, whether the controller chooses them) for a
        request: the engine's setting, 0 for "off", the controller for "auto"
        (k up to the engine's k), or a fixed {"k": n} (optionally naming the
        engine's own method)."""
        spec = params.speculation
        if spec is None:
            if self.proposer is None:
                return 0, False
            return self.speculation.k, self.controller is not None
        if spec == "off":
            return 0, False
        if spec == "auto":
            if self.proposer is None:
                return 0, False            # nothing to draft with: auto means off
            if self.controller is None:    # an engine with a fixed k: start the controller now
                self.controller = Controller(self.runner, self.proposer, k_max=max(self.speculation.k, 1))
            return self.controller.k_max, True
        unknown = set(spec) - {"k", "method"}
        if unknown:
            raise ValueError(f"request speculation {spec!r}: unknown keys {sorted(unknown)} (allowed: k, method)")
        if self.proposer is None or spec.get("method", self.method) != self.method:
            raise ValueError(f"request speculation {spec!r} needs a drafter this engine does not run "
                             f"(engine speculation: {self.method!r})")
        k = spec.get("k", self.speculation.k)
        if not isinstance(k, int) or not 0 <= k <= 64:
            raise ValueError(f"request speculation k must be an integer in 0..64, got {k!r}")
        return k, False

    # ---- public API -----------------------------------------------------------------------------------------

    def logits(self, token_ids) -> torch.Tensor:
        """Teacher-forced target logits (len(token_ids), V) float32 of one sequence."""
        ids = self._encode(token_ids)
        slot = self.runner.cache.allocate()
        try:
            return self.runner.run([Chunk(slot, 0, ids)], all_logits=True).logits
        finally:
            self.runner.cache.free(slot)

    def _make_request(self, prompt, params: SamplingParams | None, index: int) -> Request:
        """A validated request, not yet queued; ValueError names what is wrong."""
        params = params or SamplingParams()
        ids = self._encode(prompt)
        cap = self.runner.cache.capacity
        if len(ids) + params.max_tokens > cap:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} exceed "
                             f"max_seq_len {cap}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json in the checkpoint")
        k, auto = self._request_k(params)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.runner.model.device).manual_seed(  # where the probs live
                params.seed if params.seed is not None else random.getrandbits(63))
        return Request(next(self._ids), index, ids, params, k, gen, stats=CompletionStats(prompt_tokens=len(ids)),
                       auto=auto)

    def _queue(self, req: Request) -> None:
        self._requests[req.id] = req
        self.scheduler.add(req)
        self.telemetry.requests_added += 1

    def add_request(self, prompt, params: SamplingParams | None = None, index: int = 0) -> int:
        """Validate and queue one request; returns its id. Raises ValueError on bad input, queuing nothing."""
        req = self._make_request(prompt, params, index)
        self._queue(req)
        return req.id

    def abort(self, request_id: int) -> bool:
        """Stop a queued or running request now and free its KV cache and draft
        state; False if it is unknown or already finished."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self.telemetry.requests_aborted += 1
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        self._finish(req)
        return True

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def stats(self) -> dict:
        """A snapshot for monitoring: queue, KV use and the cumulative speculation figures."""
        t, cache = self.telemetry, self.runner.cache
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_slots_used": cache.num_slots - cache.free_slots,
            "kv_slots": cache.num_slots,
            "kv_tokens_used": sum(r.num_cached for r in self.scheduler.running),
            "kv_tokens": self.scheduler.kv_budget,
            "requests_added": t.requests_added,
            "requests_finished": t.requests_finished,
            "requests_aborted": t.requests_aborted,
            "steps": t.steps,
            "generated_tokens": t.generated_tokens,
            "draft_tokens": t.draft_tokens,
            "accepted_tokens": t.accepted_tokens,
            "acceptance_per_position": t.acceptance_per_position,
            "k_histogram": dict(t.k_histogram),
            "method": self.method,
            # expert work: routed rows per distinct expert loaded, and expert weight bytes per committed token
            "expert_reuse": t.expert_rows / t.experts_loaded if t.experts_loaded else None,
            "expert_bytes_per_token": (t.experts_loaded * self._expert_bytes / t.generated_tokens
                                       if t.generated_tokens and t.experts_loaded else None),
            **(self.controller.stats() if self.controller is not None else
               {"cost_model_mape": None, "controller_fallback": False, "controller_overhead": None}),
        }

    def close(self) -> None:
        """Release what the runner holds outside this process (EP workers); idempotent."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Completions of a batch of prompts (strings or token-id lists), in order,
        run with continuous batching (at most max_batch at a time)."""
        reqs = self._add_all(prompts, params)
        while any(not r.finished for r in reqs):
            self.step()
        return [r.completion(self.tokenizer is not None) for r in reqs]

    def generate_stream(self, prompts, params: SamplingParams | list[SamplingParams] | None = None
                        ) -> Iterator[StreamChunk]:
        """Like generate, yielding what every step adds to every request."""
        reqs = self._add_all(prompts, params)
        ids = {r.id for r in reqs}
        while any(not r.finished for r in reqs):
            for chunk_req, chunk in self.step():
                if chunk_req.id in ids:
                    yield chunk

    def _add_all(self, prompts, params) -> list[Request]:
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        # Validate everything before queuing anything, so a bad prompt loses no request.
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            try:
                reqs.append(self._make_request(p, sp, i))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for r in reqs:
            self._queue(r)
        return reqs

    # ---- the step -------------------------------------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        if req.slot is not None:
            self.runner.cache.free(req.slot)
            req.slot = None
        req.num_cached = 0
        req.stats.preemptions += 1
        if self.proposer is not None:
            self.proposer.release(req.id)

    def _finish(self, req: Request) -> None:
        self.scheduler.remove(req)
        if req.slot is not None:
            self.runner.cache.free(req.slot)
            req.slot = None
        if self.proposer is not None:
            self.proposer.release(req.id)
        if self.controller is not None:
            self.controller.forget(req.id)
        if self._requests.pop(req.id, None) is not None and req.finish_reason != "abort":
            self.telemetry.requests_finished += 1

    def _propose(self, plan: list[Scheduled]) -> dict[int, Proposal]:
        wanted = [s for s in plan if s.k > 0 and not s.partial]
        if not wanted or self.proposer is None:
            return {}
        inputs = [DraftInput(s.req.id, s.req.tokens, s.k, s.req.params.temperature, s.req.params.top_k,
                             s.req.params.top_p, s.req.generator) for s in wanted]
        return {s.req.id: p for s, p in zip(wanted, self.proposer.propose(inputs))}

    def step(self) -> list[tuple[Request, StreamChunk]]:
        """Run one engine step; returns a StreamChunk per request that ran.
        What it measured is left in `last_step` and added to `telemetry`."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(self._preempt)
        if not plan:
            return []
        for s in plan:
            if s.req.slot is None:
                s.req.slot = self.runner.cache.allocate()
        ctl = self.controller
        plan_s = early_s = 0.0
        proposals = None
        if ctl is not None and any(s.req.auto for s in plan):
            if self.proposer is not None and self.proposer.cheap:
                # A drafter that costs nothing next to a step (n-gram lookup) is asked at the caps first, so
                # the plan neither prices nor counts drafts it cannot deliver (no match: nothing to draft).
                te = time.perf_counter()
                proposals = self._propose(plan)
                for s in plan:
                    if s.req.auto and s.k > 0:
                        prop = proposals.get(s.req.id)
                        s.k = min(s.k, len(prop.tokens)) if prop is not None else 0
                        s.kind = prop.kind if prop is not None else None
                early_s = time.perf_counter() - te
            plan_s = ctl.plan(plan, lambda s: s.req.auto)
        else:
            ctl = None
        t1 = time.perf_counter()
        if proposals is None:
            proposals = self._propose(plan)
        drafts = [proposals[s.req.id].tokens[:s.k] if s.req.id in proposals else [] for s in plan]
        t2 = time.perf_counter()
        draft_s = t2 - t1 + early_s               # the drafter's time, before or after the plan
        chunks, rows = [], []
        for s, d in zip(plan, drafts):
            r = s.req
            chunks.append(Chunk(r.slot, r.num_cached, r.tokens[r.num_cached:r.num_cached + s.num_new] + d))
            rows.append(1 if s.partial else len(d) + 1)
        # A greedy request (or a prompt's unfinished part) needs only its rows' argmax, which is all that
        # crosses the EP control plane for it; one host transfer of the argmax per step. A sampled one draws
        # its verification's uniforms now and, where its drafts are one-hot (n-gram, synthetic, none), is
        # verified where its rows are (`sample`: on its EP worker) and only the outcome comes back; one whose
        # drafter gave probabilities (a draft model, layer skip) brings its rows in full and is verified here.
        full, sample, uniforms = [], [], []
        for s, d in zip(plan, drafts):
            p = s.req.params
            if p.temperature > 0 and not s.partial:
                u = draw_uniforms(len(d), s.req.generator)
                prop = proposals.get(s.req.id)
                onehot = not d or prop is None or prop.probs is None
                full.append(not onehot)
                sample.append(SampleSpec(p.temperature, p.top_k, p.top_p, u) if onehot else None)
                uniforms.append(u)
            else:
                full.append(False)
                sample.append(None)
                uniforms.append(None)
        out = self.runner.run(chunks, num_logits=rows, routing=True, full=full,
                              sample=sample if any(x is not None for x in sample) else None)
        logits = out.logits
        best = out.argmax.tolist()
        sampled = iter(out.sampled or ())
        t3 = time.perf_counter()
        report = StepReport(num_requests=len(plan), num_tokens=sum(len(c.tokens) for c in chunks))
        events, results, at, full_at = [], [], 0, 0
        for s, n, d, f, spec, u in zip(plan, rows, drafts, full, sample, uniforms):
            r = s.req
            ids, at = best[at:at + n], at + n
            if s.partial:
                r.num_cached += s.num_new
                continue
            if spec is not None:
                accepted, nxt = next(sampled)
            elif f:
                p = r.params
                block, full_at = logits[full_at:full_at + n], full_at + n
                probs = probs_from_logits(block, p.temperature, p.top_k, p.top_p)
                accepted, nxt = verify_sampling_u(probs, d, proposals[r.id].probs[:len(d)], u)
            else:
                accepted, nxt = accept_greedy(ids, d)
            r.num_cached += s.num_new + accepted
            r.stats.steps += 1
            r.stats.draft_tokens += len(d)
            r.stats.accepted_tokens += accepted
            self.telemetry.record_verify(len(d), accepted)
            results.append((r.id, s.k, accepted, r.auto))
            report.k.append(len(d))
            report.draft_tokens += len(d)
            report.accepted_tokens += accepted
            new = self._commit(r, d[:accepted] + [nxt])
            report.committed_tokens += len(new)
            events.append((r, StreamChunk(r.index, new, self._text_delta(r), len(d), accepted, r.finished,
                                          r.finish_reason, s.k)))
            if r.finished:
                self._finish(r)
        t4 = time.perf_counter()
        if out.routing is not None:
            report.distinct_experts = out.routing.distinct_experts
            report.tokens_per_expert = out.routing.tokens_per_expert.tolist()
            self.telemetry.experts_loaded += sum(report.distinct_experts)
            self.telemetry.expert_rows += int(out.routing.tokens_per_expert.sum())
        report.extra.update(out.extra)
        report.phase_s = {"schedule": t1 - t0 - early_s, "propose": draft_s, "forward": t3 - t2, "verify": t4 - t3}
        report.step_s = t4 - t0
        if ctl is not None:
            report.phase_s["plan"] = plan_s
            report.phase_s["schedule"] -= plan_s
            if out.routing is not None and out.routing.token_experts is not None and not ctl.quiet:
                ctl.observe_routing([s.req.id for s in plan], [len(c.tokens) for c in chunks],
                                    out.routing.token_experts)
            ctl.observe(results, [len(c.tokens) for c in chunks], [len(d) for d in drafts],
                        target_s=report.step_s - draft_s - plan_s, draft_s=draft_s, step_s=report.step_s,
                        distinct=report.distinct_experts or None)
        tel = self.telemetry
        tel.steps += 1
        tel.generated_tokens += report.committed_tokens
        tel.draft_tokens += report.draft_tokens
        tel.accepted_tokens += report.accepted_tokens
        tel.step_seconds += report.step_s
        self.last_step = report
        return events

    def _commit(self, r: Request, tokens: list[int]) -> list[int]:
        """Append tokens one by one until a stop condition; returns those kept."""
        p = r.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        kept = []
        for t in tokens:
            r.output.append(t)
            kept.append(t)
            if p.stop:
                text = self._decode(r.output)
                hit = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if hit >= 0:
                    r.text, r.finish_reason = text[:hit], "stop"
                    return kept
            if t in stop_ids:
                r.finish_reason = "stop"
                break
            if len(r.output) >= p.max_tokens:
                r.finish_reason = "length"
                break
        if self.tokenizer is not None:
            r.text = self._decode(r.output)
        return kept

    def _text_delta(self, r: Request) -> str:
        """New stable text. Until the request ends, a trailing incomplete character
        is held back, and so are the last len(stop) - 1 characters, which a stop
        string completed by a later token would remove."""
        text = r.text
        if not r.finished:
            text = text.rstrip("\ufffd")
            hold = max((len(s) for s in r.params.stop), default=1) - 1
            text = text[:len(text) - hold] if hold else text
        delta = text[r.emitted:] if len(text) > r.emitted else ""
        r.emitted = max(r.emitted, len(text))
        return delta
