"""`specmoe serve`: start a local Ray instance (or join one), place the router
actor, which builds the engine and serves gRPC, and wait. SIGTERM or SIGINT
drains: no new requests, in-flight ones finish, then the process exits 0.

With a local Ray instance, the process that starts Ray and serves runs in a
session of its own, and `specmoe serve` forwards SIGINT/SIGTERM to it: a
Ctrl-C in the terminal (SIGINT to the whole foreground process group) then
starts a drain instead of also killing Ray's processes, which must outlive
it. (Under systemd use KillMode=mixed, so that only the main process gets
SIGTERM.) Ray is started with ray.init(address="local"): a new
instance with random ports, never another one running on the machine.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgspec

from .config import ServeConfig
from .router_actor import model_name, router_actor_class


def _check(cfg: ServeConfig) -> None:
    """Errors we can name before starting Ray."""
    ec = cfg.engine
    if ec.model is not None and not Path(ec.model).is_dir():
        raise ValueError(f"engine.model: {ec.model} is not a checkpoint directory")
    if ec.ep > 1:
        import importlib.util
        if importlib.util.find_spec("specmoe.experts.ep_runner") is None:
            raise RuntimeError(f"--ep {ec.ep}: expert parallelism is not available in this specmoe build "
                               f"(specmoe.experts.ep_runner missing); serve with --ep 1")
    for f in (cfg.server.tls_cert, cfg.server.tls_key):
        if f is not None and not Path(f).is_file():
            raise ValueError(f"server TLS: {f} does not exist")


def run(cfg: ServeConfig, log=print) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. With a local Ray instance the serving
    process runs in a session of its own and this one forwards SIGINT/SIGTERM to it (see above)."""
    _check(cfg)
    if cfg.ray.address is not None:
        return _serve(cfg, log)
    child = subprocess.Popen([sys.executable, "-c", "from specmoe.cluster.serve import _child_main; _child_main()"],
                             stdin=subprocess.PIPE, start_new_session=True)
    forwarded = []

    def forward(signum, _frame):
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    child.stdin.write(msgspec.json.encode(cfg))
    child.stdin.close()
    return child.wait()


def _child_main() -> None:
    """The serving process of a local instance: config as JSON on stdin."""
    cfg = msgspec.json.decode(sys.stdin.buffer.read(), type=ServeConfig)
    parent = os.getppid()
    try:
        code = _serve(cfg, print, orphaned=lambda: os.getppid() != parent)
    except (ValueError, RuntimeError, ConnectionError) as e:
        print(f"specmoe: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _serve(cfg: ServeConfig, log, orphaned=lambda: False) -> int:
    """Start or join Ray, place the router actor, wait for a signal (or, for the serving
    process of a local instance, for its front process to vanish), drain."""
    import ray
    rc = cfg.ray
    if rc.address is None:   # "local": never join whatever cluster happens to run on this machine
        ray.init(address="local", num_cpus=rc.num_cpus, include_dashboard=rc.include_dashboard,
                 _metrics_export_port=rc.metrics_export_port, namespace=rc.namespace)
    else:
        ray.init(address=rc.address, namespace=rc.namespace)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):   # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        opts = {"num_cpus": rc.router_cpus, "max_concurrency": 4}
        if cfg.engine.device.startswith("cuda") and cfg.engine.ep == 1:
            opts["num_gpus"] = 1
        actor = router_actor_class().options(**opts).remote(msgspec.json.encode(cfg))
        info = ray.get(actor.ready.remote())
        if "error" in info:
            log(f"specmoe: error: {info['error']}", file=sys.stderr)
            return 2
        where = f"{cfg.server.host}:{info['port']}"
        tls = "TLS" if cfg.server.tls_cert else "plaintext"
        auth = "bearer token" if cfg.server.token else "no authentication"
        metrics = f", Prometheus metrics on :{rc.metrics_export_port}" if rc.address is None and \
            rc.metrics_export_port else ""
        log(f"specmoe: serving {model_name(cfg.engine)} on {where} (node {info['node_ip']}, {tls}, {auth}, "
            f"ep {cfg.engine.ep}, speculation {cfg.engine.speculation}{metrics})", flush=True)
        while not stop.wait(2.0):
            if orphaned():   # `specmoe serve` was killed without a chance to forward a signal
                log("specmoe: the front process is gone", flush=True)
                break
            try:
                ray.get(actor.alive.remote(), timeout=30)
            except Exception as e:   # noqa: BLE001 - the actor died: nothing left to serve
                log(f"specmoe: error: the router actor failed: {e}", file=sys.stderr)
                return 1
        log("specmoe: draining: no new requests; waiting for in-flight ones", flush=True)
        t0 = time.monotonic()
        ok = ray.get(actor.drain.remote(cfg.server.drain_timeout_s))
        log(f"specmoe: drained in {time.monotonic() - t0:.1f}s" if ok else
            f"specmoe: drain timed out after {cfg.server.drain_timeout_s}s; remaining requests cancelled",
            flush=True)
        ray.kill(actor)
        return 0
    finally:
        ray.shutdown()
