"""The socket control plane of expert parallelism: one stream connection per
worker (Unix socket on the router's node, TCP elsewhere), carrying the step
plan out and the step result back.

Why not Ray for this: a plain actor call per worker and step costs ~1-3 ms of
Ray machinery, and a Ray compiled graph, though faster, keeps every idle
reader spinning on its shared-memory channel (sched_yield; ~25% of a core per
worker measured on the 2-core box), which slows whatever else shares the
cores, the router included. A blocked socket read costs nothing while idle and
the kernel wakes the reader when the bytes arrive; a worker process that dies
closes its socket, so the router sees the death at once as end-of-file.

Frames (little-endian):

- router -> worker: `u32 n` then n bytes of msgpack `StepPlan` (n = 0: stop).
- worker -> router: `u32 meta, u32 logits, u8 status` then `meta` bytes
  (status 0 or 2: msgpack `StepResult` without logits; 1: an error message in
  UTF-8), then, with status 0, `logits` bytes: the rank's float32 logits rows,
  which the router receives straight into a tensor. With status 2 the rows are
  not on the socket but at the start of the worker's shared-memory region.

A worker on the router's node creates that region (a memfd of SHM_BYTES,
whose pages exist only once written) and hands its descriptor over the Unix
socket with its hello (SCM_RIGHTS), so no name is created and nothing is left
behind. Rows that fit go through it: one copy on each side and a 9-byte frame,
instead of megabytes pushed through the socket buffer in pieces, each a
wake-up of the reader (sampled rows at batch 64 are 1 MiB per step for a
4096-token vocabulary). The router copies the rows out before it sends the
next plan, and a worker writes the region only while it serves a plan, so the
two never touch it at once. Rows that do not fit, and every TCP worker, go
inline as before.

Ray still starts, places and kills the workers and carries every other call;
the connection is made once, after the process group, from worker to router:
the router listens on its own node's address, port 0, and on an abstract Unix
socket (Linux), a worker on the router's node takes the Unix socket, any other
TCP, and the router accepts only connections that present the token it handed
out through Ray.
"""

import mmap
import os
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable

import torch

_PLAN = struct.Struct("<I")
_RESULT = struct.Struct("<IIB")
_HELLO = struct.Struct("<16sI")          # token, rank
_INLINE, _FAILED, _SHARED = 0, 1, 2       # result status: rows on the socket, an error, rows in shared memory
SHM_BYTES = 1 << 28   # a local worker's shared logits region: virtual size (pages are made as rows are written)


class ChannelError(RuntimeError):
    """A worker's connection closed (`closed`: its process is gone) or its step raised."""

    def __init__(self, rank: int, closed: bool, message: str):
        super().__init__(message)
        self.rank, self.closed = rank, closed


def _recv_into(sock: socket.socket, view: memoryview, rank: int) -> None:
    while view.nbytes:
        try:
            n = sock.recv_into(view)
        except OSError as e:          # e.g. connection reset by a killed peer
            raise ChannelError(rank, True, f"control connection lost: {e}") from None
        if n == 0:
            raise ChannelError(rank, True, "control connection closed")
        view = view[n:]


def _send(sock: socket.socket, buffers: list) -> None:
    """sendall over several buffers without joining them (sendmsg may send part)."""
    views = [v.cast("B") for v in map(memoryview, buffers) if v.nbytes]
    while views:
        n = sock.sendmsg(views)
        while n:
            if n >= views[0].nbytes:
                n -= views.pop(0).nbytes
            else:
                views[0], n = views[0][n:], 0


def _nodelay(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---- worker side ---------------------------------------------------------------------------------------------

class SharedRows:
    """A worker's shared-memory region for its logits rows (see the module doc)."""

    def __init__(self, nbytes: int):
        self.fd = os.memfd_create("specmoe-ep-logits", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, nbytes)
        self.map = mmap.mmap(self.fd, nbytes)
        self.view = memoryview(self.map)

    def put(self, rows) -> bool:
        """Copy `rows` (a buffer) to the start of the region; False if it does not fit."""
        src = memoryview(rows).cast("B")
        if src.nbytes > self.view.nbytes:
            return False
        self.view[:src.nbytes] = src
        return True

    def close(self) -> None:
        self.view.release()
        self.map.close()


def connect(address: tuple, token: bytes, rank: int, timeout_s: float, same_node: bool,
            shm_bytes: int = SHM_BYTES) -> tuple[socket.socket, SharedRows | None]:
    """The worker's connection to `RouterChannel.address`: over the Unix socket
    when on the router's node (a third of TCP's time per 2 MiB of logits on the
    2-core box, and less per small frame), with a shared-memory region of
    shm_bytes for its rows (0: none); else over TCP, rows inline."""
    host, port, unix = address
    sock = None
    if same_node and unix is not None:
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            sock.connect(unix)
        except OSError:          # another network namespace after all: TCP
            sock.close()
            sock = None
    if sock is None:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        _nodelay(sock)
    sock.settimeout(None)
    hello = _HELLO.pack(token, rank)
    region = None
    if sock.family == socket.AF_UNIX and shm_bytes > 0 and hasattr(os, "memfd_create"):
        region = SharedRows(shm_bytes)
        socket.send_fds(sock, [hello], [region.fd])
        os.close(region.fd)          # the mapping stays; the router holds its own descriptor
    else:
        sock.sendall(hello)
    return sock, region


def serve(sock: socket.socket, step: Callable[[memoryview], tuple[bytes, object]],
          region: SharedRows | None = None) -> None:
    """The worker's loop (in its own thread): read a plan, run `step` on it
    (-> result bytes, logits buffer), send the result, its rows through
    `region` where they fit; ends when the router closes the connection or
    sends a stop frame."""
    head, buf = bytearray(_PLAN.size), bytearray(1 << 12)
    try:
        while True:
            _recv_into(sock, memoryview(head), -1)
            (n,) = _PLAN.unpack(head)
            if n == 0:
                return
            if n > len(buf):
                buf = bytearray(n)
            plan = memoryview(buf)[:n]
            _recv_into(sock, plan, -1)
            try:
                meta, logits = step(plan)
                status = _INLINE
            except Exception as e:     # noqa: BLE001 - reported to the router, which stops every worker
                meta, logits, status = f"{type(e).__name__}: {e}".encode(), b"", _FAILED
            nbytes = memoryview(logits).nbytes     # a rank without rows sends none (its (0, V) array)
            if nbytes and status == _INLINE and region is not None and region.put(logits):
                logits, status = b"", _SHARED
            _send(sock, [_RESULT.pack(len(meta), nbytes, status), meta, logits])
    except (ChannelError, OSError):
        return
    finally:
        sock.close()
        if region is not None:
            region.close()


# ---- router side ---------------------------------------------------------------------------------------------

class RouterChannel:
    """The router's end: listen, accept one connection per rank, broadcast plans, gather results."""

    def __init__(self, host: str, world: int):
        self.W, self.token = world, secrets.token_bytes(16)
        self._listen = [socket.create_server((host, 0))]
        unix = None
        if sys.platform.startswith("linux"):      # abstract namespace: no file to clean up
            unix = f"\0specmoe-ep-{os.getpid()}-{secrets.token_hex(8)}"
            self._listen.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
            self._listen[1].bind(unix)
            self._listen[1].listen()
        self.address = (host, self._listen[0].getsockname()[1], unix)     # (TCP host, port, Unix name)
        self.socks: list[socket.socket | None] = [None] * world
        self.shared: list[memoryview | None] = [None] * world     # a local worker's rows region
        self._maps: list[mmap.mmap] = []
        self._poll = select.poll()
        self._rank_of: dict[int, int] = {}
        self._head = bytearray(_RESULT.size)

    def accept(self, timeout_s: float) -> None:
        """Accept every rank's connection (they connect on their `attach` call);
        connections without the token are dropped."""
        deadline = time.monotonic() + timeout_s
        while any(s is None for s in self.socks):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r, s in enumerate(self.socks) if s is None]
                raise TimeoutError(f"EP workers {missing} did not open their control connection within "
                                   f"{timeout_s:.0f} s")
            ready, _, _ = select.select(self._listen, [], [], left)
            if not ready:
                continue
            conn, _ = ready[0].accept()
            conn.settimeout(min(left, 10.0))
            try:
                hello, fds, _, _ = socket.recv_fds(conn, _HELLO.size, 1, socket.MSG_WAITALL)
                token, rank = _HELLO.unpack(hello)
            except (OSError, struct.error):
                conn.close()
                continue
            if token != self.token or not 0 <= rank < self.W or self.socks[rank] is not None:
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            if fds:                              # a local worker's shared rows region
                try:
                    m = mmap.mmap(fds[0], 0, prot=mmap.PROT_READ)
                finally:
                    for fd in fds:
                        os.close(fd)
                self._maps.append(m)
                self.shared[rank] = memoryview(m)
            _nodelay(conn)
            conn.settimeout(None)
            self.socks[rank] = conn
            self._rank_of[conn.fileno()] = rank
            self._poll.register(conn, select.POLLIN)
        for s in self._listen:
            s.close()

    def broadcast(self, plan: bytes) -> None:
        frame = _PLAN.pack(len(plan)) + plan
        for r, s in enumerate(self.socks):
            try:
                s.sendall(frame)
            except OSError as e:
                raise ChannelError(r, True, f"sending the plan failed: {e}") from None

    def gather(self, logits: torch.Tensor, spans: list[list[tuple[int, int]]], timeout_s: float, poll_s: float,
               on_poll: Callable[[], None]) -> list[bytearray]:
        """Every rank's result bytes, in rank order, while its logits rows land
        straight in their rows of `logits` (R, V): rank r sends its rows in the
        order of spans[r], each (first row, rows). on_poll runs whenever poll_s
        passes with nothing new (a liveness check). Raises ChannelError for a
        closed connection or a failed step, TimeoutError past timeout_s."""
        # (0, V) when no row is wanted in full (every request greedy); memoryview refuses to cast that
        flat = memoryview(logits.numpy().reshape(-1)).cast("B") if logits.numel() else memoryview(b"")
        row = logits.shape[1] * logits.element_size()
        out: list = [None] * self.W
        pending = self.W
        deadline = time.monotonic() + timeout_s
        while pending:
            events = self._poll.poll(1e3 * poll_s)
            if not events:
                on_poll()
                if time.monotonic() > deadline:
                    late = [r for r in range(self.W) if out[r] is None]
                    raise TimeoutError(f"EP workers {late} of {self.W} did not answer within {timeout_s:.0f} s")
                continue
            for fd, _ in events:
                r = self._rank_of[fd]
                if out[r] is not None:     # a worker never speaks unasked: this is its connection closing
                    raise ChannelError(r, True, "control connection closed")
                out[r] = self._read(r, [flat[a * row:(a + n) * row] for a, n in spans[r]])
                pending -= 1
        return out

    def _read(self, r: int, rows: list[memoryview]) -> bytearray:
        sock = self.socks[r]
        _recv_into(sock, memoryview(self._head), r)
        meta_n, logits_n, status = _RESULT.unpack(self._head)
        meta = bytearray(meta_n)
        _recv_into(sock, memoryview(meta), r)
        if status == _FAILED:
            raise ChannelError(r, False, meta.decode(errors="replace"))
        want = sum(v.nbytes for v in rows)
        if logits_n != want:
            raise ChannelError(r, False, f"sent {logits_n} bytes of logits, expected {want}")
        if status == _SHARED:
            region, at = self.shared[r], 0
            if region is None:
                raise ChannelError(r, False, "sent its rows through a shared region it never handed over")
            for view in rows:
                view[:] = region[at:at + view.nbytes]
                at += view.nbytes
            return meta
        for view in rows:
            _recv_into(sock, view, r)
        return meta

    def closed_ranks(self, wait_s: float) -> list[int]:
        """Ranks whose connection reads end-of-file within wait_s (after a failure:
        which worker is gone, as opposed to a survivor whose collective failed)."""
        closed, poll = set(), select.poll()
        for s in self.socks:
            if s is not None:
                poll.register(s, select.POLLIN)
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            events = poll.poll(1e3 * left)
            for fd, ev in events:
                r = self._rank_of[fd]
                try:
                    gone = self.socks[r].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    closed.add(r)
                poll.unregister(fd)
            if not events:
                break
        return sorted(closed)

    def close(self) -> None:
        for s in self.socks:
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
        self.socks = [None] * self.W
        for view in self.shared:
            if view is not None:
                view.release()
        self.shared = [None] * self.W
        for m in self._maps:
            m.close()
        self._maps = []
        for s in self._listen:
            try:
                s.close()
            except OSError:
                pass


def start_thread(sock: socket.socket, step, rank: int, region: SharedRows | None = None) -> threading.Thread:
    t = threading.Thread(target=serve, args=(sock, step, region), name=f"specmoe-ep-control-{rank}", daemon=True)
    t.start()
    return t
