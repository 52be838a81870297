"""The Engine behind a thread: the Engine is not thread-safe, so one thread
owns it and runs `step()` while there is work. Other threads (gRPC handlers)
talk to it through a command queue: add a request, abort one, ask for
stats. Each request's StreamChunks go to its own queue.

Ownership: a `Handle` belongs to the gRPC handler that submitted it; the
loop thread alone touches the Engine and fills the handle's queue, ending it
with a StreamChunk whose `finished` is set, or an `Error`.
"""

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..router.params import SamplingParams
from .metrics import ServeMetrics

log = logging.getLogger("specmoe.serve")


@dataclass
class Error:
    """Ends a handle's queue: the engine refused the request (ValueError) or failed."""
    message: str
    invalid: bool                   # True: bad input (ValueError from add_request)


@dataclass
class Handle:
    prompt: list[int]
    params: SamplingParams
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    request_id: int | None = None   # set by the loop thread once queued
    aborted: bool = False           # set by the loop thread


class EngineLoop:
    def __init__(self, engine, metrics: ServeMetrics | None = None, idle_wait_s: float = 0.05):
        self.engine = engine
        self.metrics = metrics or ServeMetrics(enabled=False)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, Handle] = {}     # request id -> handle, loop thread only
        self._idle_wait_s = idle_wait_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="specmoe-engine-loop", daemon=True)
        self.steps_failed = 0
        self.tokens_per_rank: list[int] = []   # routed tokens per EP rank since start (loop thread)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what is left and end the thread."""
        self._stop.set()
        self._cmds.put(("wake",))
        self._thread.join(timeout)

    # ---- called from any thread ---------------------------------------------------------------------------

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        h = Handle(prompt, params)
        self._cmds.put(("add", h))
        return h

    def abort(self, h: Handle) -> None:
        self._cmds.put(("abort", h))

    def stats(self, timeout: float = 10.0) -> dict:
        """Engine.stats(), taken on the loop thread between steps."""
        f: Future = Future()
        self._cmds.put(("stats", f))
        return f.result(timeout)

    # ---- loop thread ----------------------------------------------------------------------------------------

    def _command(self, cmd) -> None:
        kind = cmd[0]
        if kind == "add":
            h = cmd[1]
            if h.aborted:
                return
            try:
                h.request_id = self.engine.add_request(h.prompt, h.params)
            except ValueError as e:
                h.out.put(Error(str(e), invalid=True))
                return
            self._live[h.request_id] = h
        elif kind == "abort":
            h = cmd[1]
            if h.aborted:
                return
            h.aborted = True
            if h.request_id is not None and self._live.pop(h.request_id, None) is not None:
                self.engine.abort(h.request_id)
                self.metrics.request_done("abort")
            h.out.put(Error("aborted", invalid=False))
        elif kind == "stats":
            f = cmd[1]
            try:
                s = self.engine.stats()
                s.setdefault("tokens_per_rank", list(self.tokens_per_rank))
                f.set_result(s)
            except Exception as e:   # noqa: BLE001 - handed to the caller
                f.set_exception(e)

    def _run(self) -> None:
        eng = self.engine
        while True:
            # Block for a command only when the engine is idle; otherwise take what is there and step.
            try:
                cmd = self._cmds.get(timeout=self._idle_wait_s) if not eng.has_work else self._cmds.get_nowait()
                self._command(cmd)
                while True:
                    self._command(self._cmds.get_nowait())
            except queue.Empty:
                pass
            if self._stop.is_set():
                break
            if not eng.has_work:
                continue
            try:
                events = eng.step()
            except Exception as e:   # noqa: BLE001 - fail the requests, keep serving
                log.exception("engine step failed")
                self.steps_failed += 1
                self._fail_all(f"engine step failed: {type(e).__name__}: {e}")
                continue
            for req, chunk in events:
                h = self._live.get(req.id)
                self.metrics.verify_positions(chunk.draft_tokens, chunk.accepted_tokens)
                if h is None:
                    continue
                h.out.put(chunk)
                if chunk.finished:
                    del self._live[req.id]
                    self.metrics.request_done(chunk.finish_reason or "length")
            rep = eng.last_step
            per_rank = self._rank_tokens(rep)
            for r, n in enumerate(per_rank):
                if r >= len(self.tokens_per_rank):
                    self.tokens_per_rank.append(0)
                self.tokens_per_rank[r] += n
            self.metrics.step(rep, eng.stats(), per_rank)
        self._fail_all("server shutting down")

    def _rank_tokens(self, rep) -> list[int]:
        """Routed (token, expert) rows per EP rank this step: tokens per expert summed by the
        placement's owner (one rank without EP), else the EP runner's per-rank local-expert counts."""
        owner = getattr(getattr(self.engine.runner, "placement", None), "owner", None)
        if rep.tokens_per_expert:
            out: list[int] = []
            for e, n in enumerate(sum(col) for col in zip(*rep.tokens_per_expert)):
                r = owner[e] if owner else 0
                out += [0] * (r + 1 - len(out))
                out[r] += n
            return out
        local = rep.extra.get("tokens_per_local_expert")   # [rank][layer][local expert]
        if isinstance(local, list):
            return [int(sum(sum(layer) for layer in rank)) for rank in local]
        return []

    def _fail_all(self, message: str) -> None:
        for rid, h in list(self._live.items()):
            try:
                self.engine.abort(rid)
            except Exception:   # noqa: BLE001 - the engine may be broken; the handle still ends
                log.exception("abort of request %d failed", rid)
            h.out.put(Error(message, invalid=False))
            self.metrics.request_done("error")
        self._live.clear()


def wait_idle(loop: EngineLoop, timeout: float) -> bool:
    """Poll until the engine has no waiting or running request; False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = loop.stats()
        if s["waiting"] == 0 and s["running"] == 0:
            return True
        time.sleep(0.05)
    return False
