"""Serving metrics through ray.util.metrics, exported on Ray's Prometheus
endpoint (`ray start --metrics-export-port`, or ray.init(_metrics_export_port=)).

Ray prefixes every application metric with `ray_` and counters get a
`_total` suffix: the counter `specmoe_generated_tokens` is scraped as
`ray_specmoe_generated_tokens_total`. Each metric is recorded once per engine
step (from `Engine.last_step` and `Engine.stats()`) or once per request
(TTFT, TPOT, finish reason); the Grafana dashboard in cluster/grafana queries
the names listed in METRICS (tests/test_cluster_configs.py checks it).
"""

import threading

# name -> (kind, description, tag keys)
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "specmoe_requests": ("counter", "Requests ended, by finish reason (length, stop, abort, error)",
                         ("finish_reason",)),
    "specmoe_rejected_requests": ("counter", "Requests refused before queuing, by gRPC status", ("code",)),
    "specmoe_generated_tokens": ("counter", "Tokens committed to outputs", ()),
    "specmoe_draft_tokens": ("counter", "Draft tokens verified", ()),
    "specmoe_accepted_tokens": ("counter", "Draft tokens accepted", ()),
    "specmoe_verify_steps": ("counter", "Request-steps that verified (prompt parts excluded)", ()),
    "specmoe_drafted_per_position": ("counter", "Drafts verified at each draft position", ("position",)),
    "specmoe_accepted_per_position": ("counter", "Drafts accepted at each draft position", ("position",)),
    "specmoe_chosen_k": ("counter", "Request-steps by the draft length chosen", ("k",)),
    "specmoe_steps": ("counter", "Engine steps", ()),
    "specmoe_step_seconds": ("histogram", "Engine step time by phase (schedule, propose, forward, verify, "
                             "total)", ("phase",)),
    "specmoe_distinct_experts": ("histogram", "Distinct experts per MoE layer per step", ()),
    # Ray's histogram _sum is built from bucket midpoints, so exact means come from counters:
    "specmoe_expert_loads": ("counter", "Distinct experts read, summed over MoE layers and steps", ()),
    "specmoe_moe_layer_steps": ("counter", "MoE layer-steps (one per MoE layer per step)", ()),
    "specmoe_expert_tokens": ("counter", "Routed tokens per expert (summed over layers)", ("expert",)),
    "specmoe_rank_tokens": ("counter", "Routed tokens per expert-parallel rank", ("rank",)),
    "specmoe_a2a_bytes": ("counter", "All-to-all bytes (dispatch + combine), under expert parallelism", ()),
    "specmoe_cost_model_error": ("gauge", "Speculation controller: relative step-time prediction error", ()),
    "specmoe_controller_fallback": ("gauge", "Speculation controller: 1 while the cost model's error has it on "
                                    "the timing-free fallback, else 0", ()),
    "specmoe_queue_depth": ("gauge", "Requests waiting in the engine", ()),
    "specmoe_running": ("gauge", "Requests running in the engine", ()),
    "specmoe_in_flight": ("gauge", "Streams open on the gRPC server", ()),
    "specmoe_kv_slots_used": ("gauge", "KV-cache slots in use", ()),
    "specmoe_kv_tokens_used": ("gauge", "KV-cache tokens in use", ()),
    "specmoe_kv_usage": ("gauge", "KV-cache tokens in use / budget", ()),
    "specmoe_ttft_seconds": ("histogram", "Time to first token, from request arrival", ()),
    "specmoe_tpot_seconds": ("histogram", "Time per output token after the first, per request", ()),
}

_TIME_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
_EXPERT_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


def exported_name(name: str) -> str:
    """The series name a metric has on Ray's Prometheus endpoint (histograms add _bucket/_sum/_count)."""
    return f"ray_{name}_total" if METRICS[name][0] == "counter" else f"ray_{name}"


class ServeMetrics:
    """Records serving metrics; `enabled=False` (no Ray) makes every call a no-op."""

    def __init__(self, enabled: bool = True, model: str = ""):
        self.enabled = enabled
        self._lock = threading.Lock()
        self._m = {}
        if not enabled:
            return
        from ray.util import metrics as rm
        for name, (kind, desc, tags) in METRICS.items():
            if kind == "counter":
                self._m[name] = rm.Counter(name, description=desc, tag_keys=tags)
            elif kind == "gauge":
                self._m[name] = rm.Gauge(name, description=desc, tag_keys=tags)
            else:
                bounds = _EXPERT_BUCKETS if name == "specmoe_distinct_experts" else _TIME_BUCKETS
                self._m[name] = rm.Histogram(name, description=desc, boundaries=bounds, tag_keys=tags)

    def _inc(self, name, value, tags=None):
        if value:
            self._m[name].inc(value, tags=tags)

    def request_done(self, finish_reason: str) -> None:
        if self.enabled:
            with self._lock:
                self._m["specmoe_requests"].inc(1, tags={"finish_reason": finish_reason})

    def rejected(self, code: str) -> None:
        if self.enabled:
            with self._lock:
                self._m["specmoe_rejected_requests"].inc(1, tags={"code": code})

    def latency(self, ttft_s: float | None, tpot_s: float | None) -> None:
        if self.enabled:
            with self._lock:
                if ttft_s is not None:
                    self._m["specmoe_ttft_seconds"].observe(ttft_s)
                if tpot_s is not None:
                    self._m["specmoe_tpot_seconds"].observe(tpot_s)

    def in_flight(self, n: int) -> None:
        if self.enabled:
            with self._lock:
                self._m["specmoe_in_flight"].set(n)

    def step(self, report, stats: dict, rank_tokens: list[int]) -> None:
        """One engine step: `report` is Engine.last_step, `stats` Engine.stats(),
        rank_tokens[r] the tokens routed to EP rank r this step."""
        if not self.enabled:
            return
        m = self._m
        with self._lock:
            m["specmoe_steps"].inc(1)
            self._inc("specmoe_generated_tokens", report.committed_tokens)
            self._inc("specmoe_draft_tokens", report.draft_tokens)
            self._inc("specmoe_accepted_tokens", report.accepted_tokens)
            self._inc("specmoe_verify_steps", len(report.k))
            for k in report.k:
                m["specmoe_chosen_k"].inc(1, tags={"k": str(k)})
            for phase, s in report.phase_s.items():
                m["specmoe_step_seconds"].observe(s, tags={"phase": phase})
            m["specmoe_step_seconds"].observe(report.step_s, tags={"phase": "total"})
            for d in report.distinct_experts:
                if d:                   # MoE layers only
                    m["specmoe_distinct_experts"].observe(d)
            self._inc("specmoe_expert_loads", sum(report.distinct_experts))
            # MoE layers only: a dense layer's entry is 0 (a MoE layer reads at least top_k experts)
            self._inc("specmoe_moe_layer_steps", sum(1 for d in report.distinct_experts if d))
            if report.tokens_per_expert:
                for e, n in enumerate(sum(col) for col in zip(*report.tokens_per_expert)):
                    self._inc("specmoe_expert_tokens", n, {"expert": str(e)})
            for r, n in enumerate(rank_tokens):
                self._inc("specmoe_rank_tokens", n, {"rank": str(r)})
            a2a = report.extra.get("a2a_bytes", 0)
            self._inc("specmoe_a2a_bytes", sum(a2a) if isinstance(a2a, list) else a2a)
            err = stats.get("cost_model_mape")
            if err is not None:
                m["specmoe_cost_model_error"].set(float(err))
            m["specmoe_controller_fallback"].set(1.0 if stats.get("controller_fallback") else 0.0)
            m["specmoe_queue_depth"].set(stats.get("waiting", 0))
            m["specmoe_running"].set(stats.get("running", 0))
            m["specmoe_kv_slots_used"].set(stats.get("kv_slots_used", 0))
            m["specmoe_kv_tokens_used"].set(stats.get("kv_tokens_used", 0))
            m["specmoe_kv_usage"].set(stats.get("kv_tokens_used", 0) / max(stats.get("kv_tokens", 1), 1))

    def verify_positions(self, drafted: int, accepted: int) -> None:
        """One request-step's verification: positions 0..accepted-1 accepted out of `drafted`."""
        if not self.enabled:
            return
        with self._lock:
            for i in range(drafted):
                self._m["specmoe_drafted_per_position"].inc(1, tags={"position": str(i)})
            for i in range(accepted):
                self._m["specmoe_accepted_per_position"].inc(1, tags={"position": str(i)})
