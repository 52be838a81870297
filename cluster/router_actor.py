"""The router actor: a Ray actor that owns the Engine (and, with ep > 1, the
EP workers the engine places), runs the engine loop on one thread and hosts
the gRPC server in its own process, so a token costs no Ray hop on its way
to the client. Metrics are recorded here through ray.util.metrics."""

import logging
import os

import msgspec

from .config import EngineConfig, ServeConfig
from .metrics import ServeMetrics
from .server import serve_engine


def model_name(ec: EngineConfig) -> str:
    return ec.model or "bundled:tiny-moe"


def speculation_name(ec: EngineConfig) -> str:
    s = ec.speculation
    return s if isinstance(s, str) else msgspec.json.encode(s).decode()


def build_engine(ec: EngineConfig):
    """Engine.from_pretrained from an EngineConfig; a missing EP runner is a clear RuntimeError."""
    from ..router.engine import Engine
    try:
        return Engine.from_pretrained(ec.model, device=ec.device, dtype=ec.dtype, max_batch=ec.max_batch,
                                      max_seq_len=ec.max_seq_len, speculation=ec.speculation, ep=ec.ep,
                                      max_tokens_per_step=ec.max_tokens_per_step,
                                      few_row_linears=ec.few_row_linears)
    except ImportError as e:
        if ec.ep > 1:
            raise RuntimeError(f"engine.ep={ec.ep}: expert parallelism is not available in this specmoe "
                               f"build ({e}); serve with --ep 1") from None
        raise


class Router:
    """Build the engine and serve it; __init__ never raises, ready() reports a failure."""

    def __init__(self, cfg_json: bytes):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.cfg = msgspec.json.decode(cfg_json, type=ServeConfig)
        self.server, self.error = None, None
        try:
            engine = build_engine(self.cfg.engine)
            ec = self.cfg.engine
            self.server = serve_engine(engine, self.cfg.server, ServeMetrics(enabled=True), model_name(ec),
                                       ec.ep, speculation_name(ec))
        except Exception as e:   # noqa: BLE001 - reported by ready()
            self.error = f"{type(e).__name__}: {e}"

    def ready(self) -> dict:
        import ray
        if self.error is not None:
            return {"error": self.error}
        return {"port": self.server.port, "host": self.cfg.server.host, "pid": os.getpid(),
                "node_ip": ray.util.get_node_ip_address()}

    def alive(self) -> bool:
        return self.server is not None

    def drain(self, timeout: float) -> bool:
        """Stop accepting, finish what is in flight (True) or cancel it after `timeout` (False)."""
        if self.server is None:
            return True
        ok = self.server.drain(timeout)
        self.server.loop.stop()
        self.server.loop.engine.close()
        return ok


def router_actor_class():
    import ray
    return ray.remote(Router)
