"""The gRPC service: validates requests, admits them against a bounded number
of open streams, hands them to the EngineLoop and streams its chunks back.

One gRPC handler thread per open stream blocks on its request's queue; the
engine runs on the loop thread. A cancelled call or a passed deadline aborts
the request in the engine (its KV slot is freed at once).
"""

import hmac
import json
import logging
import queue
import threading
import time
from concurrent import futures

import grpc

from . import specmoe_pb2 as pb
from . import specmoe_pb2_grpc as pb_grpc
from .config import ServerConfig
from .engine_loop import EngineLoop, Error
from .metrics import ServeMetrics
from .validate import InvalidRequest, ModelLimits, parse_request

log = logging.getLogger("specmoe.serve")

_STATS_FIELDS = ("waiting", "running", "kv_slots_used", "kv_slots", "kv_tokens_used", "kv_tokens",
                 "requests_added", "requests_finished", "requests_aborted", "steps", "generated_tokens",
                 "draft_tokens", "accepted_tokens")


class Servicer(pb_grpc.SpecMoEServicer):
    def __init__(self, loop: EngineLoop, cfg: ServerConfig, model_name: str, ep: int, speculation: str,
                 metrics: ServeMetrics | None = None):
        eng = loop.engine
        self.loop, self.cfg = loop, cfg
        self.metrics = metrics or loop.metrics
        self.limits = ModelLimits(eng.config.vocab_size, eng.runner.cache.capacity, eng.method, eng.tokenizer)
        self.info = (model_name, ep, speculation)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.draining = threading.Event()
        self._expected = f"Bearer {cfg.token}".encode() if cfg.token else None

    # ---- helpers --------------------------------------------------------------------------------------------

    def _authorize(self, context) -> None:
        if self._expected is None:
            return
        got = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(got.encode(), self._expected):
            self.metrics.rejected("UNAUTHENTICATED")
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")

    def _admit(self, context) -> None:
        if self.draining.is_set():
            self.metrics.rejected("UNAVAILABLE")
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is draining; no new requests")
        with self._lock:
            if self.in_flight >= self.cfg.max_in_flight:
                full = True
            else:
                full = False
                self.in_flight += 1
                n = self.in_flight
        if full:
            self.metrics.rejected("RESOURCE_EXHAUSTED")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"queue full: {self.cfg.max_in_flight} requests in flight (server.max_in_flight)")
        self.metrics.in_flight(n)

    def _release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            n = self.in_flight
        self.metrics.in_flight(n)

    # ---- RPCs -----------------------------------------------------------------------------------------------

    def Generate(self, request, context):
        t0 = time.perf_counter()
        self._authorize(context)
        try:
            ids, params = parse_request(request, self.limits)
        except InvalidRequest as e:
            self.metrics.rejected("INVALID_ARGUMENT")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self._admit(context)
        try:
            yield from self._stream(ids, params, context, t0)
        finally:
            self._release()

    def _stream(self, ids, params, context, t0):
        h = self.loop.submit(ids, params)
        # Runs on cancel, deadline and normal end; False if the call has already ended.
        if not context.add_callback(lambda: self.loop.abort(h)):
            self.loop.abort(h)
            return
        first, t_first, n_tokens = True, None, 0
        while True:
            try:
                item = h.out.get(timeout=0.5)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(item, Error):
                if item.invalid:
                    self.metrics.rejected("INVALID_ARGUMENT")
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.message)
                if context.is_active():
                    context.abort(grpc.StatusCode.INTERNAL if item.message != "aborted" else
                                  grpc.StatusCode.CANCELLED, item.message)
                return
            if item.token_ids and t_first is None:
                t_first = time.perf_counter()
            n_tokens += len(item.token_ids)
            msg = pb.GenerateChunk(token_ids=item.token_ids, text=item.text, draft_tokens=item.draft_tokens,
                                   accepted_tokens=item.accepted_tokens, finished=item.finished,
                                   finish_reason=item.finish_reason or "", k=item.k)
            if first:
                msg.prompt_tokens = len(ids)
                first = False
            yield msg
            if item.finished:
                t_end = time.perf_counter()
                tpot = (t_end - t_first) / (n_tokens - 1) if t_first is not None and n_tokens > 1 else None
                self.metrics.latency(t_first - t0 if t_first is not None else None, tpot)
                return

    def Health(self, request, context):
        self._authorize(context)
        model, ep, spec = self.info
        return pb.HealthReply(serving=not self.draining.is_set(), model=model, ep=ep, speculation=spec)

    def GetStats(self, request, context):
        self._authorize(context)
        try:
            s = self.loop.stats()
        except Exception as e:   # noqa: BLE001 - reported to the caller
            context.abort(grpc.StatusCode.INTERNAL, f"stats failed: {e}")
        reply = pb.StatsReply(**{f: int(s.get(f, 0)) for f in _STATS_FIELDS})
        reply.acceptance_per_position.extend(s.get("acceptance_per_position", []))
        for k, v in s.get("k_histogram", {}).items():
            reply.k_histogram[int(k)] = int(v)
        reply.method = str(s.get("method", ""))
        err = s.get("cost_model_mape")
        if err is not None:
            reply.cost_model_error = err
        reply.tokens_per_rank.extend(int(x) for x in s.get("tokens_per_rank", []))
        with self._lock:
            reply.in_flight = self.in_flight
        reply.max_in_flight = self.cfg.max_in_flight
        extra = {k: v for k, v in s.items() if k not in _STATS_FIELDS and k not in (
            "acceptance_per_position", "k_histogram", "method", "cost_model_mape", "tokens_per_rank")}
        reply.extra_json = json.dumps(extra, default=str)
        return reply


def _credentials(cfg: ServerConfig):
    if cfg.tls_cert is None:
        return None
    try:
        with open(cfg.tls_key, "rb") as f:
            key = f.read()
        with open(cfg.tls_cert, "rb") as f:
            cert = f.read()
    except OSError as e:
        raise ValueError(f"server TLS: cannot read {e.filename}: {e.strerror}") from None
    return grpc.ssl_server_credentials([(key, cert)])


class GrpcServer:
    """A started gRPC server over an EngineLoop; `port` is the bound port."""

    def __init__(self, loop: EngineLoop, cfg: ServerConfig, model_name: str = "", ep: int = 1,
                 speculation: str = ""):
        self.loop, self.cfg = loop, cfg
        self.servicer = Servicer(loop, cfg, model_name, ep, speculation)
        # A streaming call holds a handler thread for its whole life: room for every admitted stream,
        # plus some so that a full server can still answer Health, GetStats and RESOURCE_EXHAUSTED.
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_in_flight + 8,
                                                             thread_name_prefix="specmoe-grpc"),
                                  maximum_concurrent_rpcs=cfg.max_in_flight + 8)
        pb_grpc.add_SpecMoEServicer_to_server(self.servicer, self.server)
        addr = f"{cfg.host}:{cfg.port}"
        creds = _credentials(cfg)
        try:
            self.port = (self.server.add_secure_port(addr, creds) if creds else
                         self.server.add_insecure_port(addr))
        except RuntimeError as e:
            raise ValueError(f"cannot bind gRPC server to {addr}: {e}") from None
        if self.port == 0:
            raise ValueError(f"cannot bind gRPC server to {addr} (address in use or not local)")
        self.server.start()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests, wait for open streams to finish (True) or the timeout (False,
        the rest are cancelled), then stop the server."""
        self.servicer.draining.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.servicer._lock:
                if self.servicer.in_flight == 0:
                    break
            time.sleep(0.05)
        else:
            log.warning("drain: %d streams still open after %.0fs; cancelling", self.servicer.in_flight, timeout)
            self.server.stop(grace=1.0).wait()
            return False
        self.server.stop(grace=1.0).wait()
        return True

    def stop(self) -> None:
        self.server.stop(grace=None)


def serve_engine(engine, cfg: ServerConfig, metrics: ServeMetrics | None = None, model_name: str = "",
                 ep: int = 1, speculation: str = "") -> GrpcServer:
    """Start the engine loop and a gRPC server over it (the router actor's job, usable in-process)."""
    loop = EngineLoop(engine, metrics).start()
    return GrpcServer(loop, cfg, model_name, ep, speculation)
