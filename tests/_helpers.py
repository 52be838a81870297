"""Assertions and process handling several test modules share (conftest puts
this folder on sys.path)."""

import signal
import socket
import subprocess
import time


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(client, proc, output, timeout_s: float) -> None:
    """Poll Health until `specmoe serve` (subprocess `proc`) is serving; fails
    with the tail of its output (`output()`) if it exits or times out."""
    from specmoe.cluster.client import RequestError
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"specmoe serve exited {proc.returncode}:\n{output()[-3000:]}"
        assert time.monotonic() < deadline, f"specmoe serve not ready:\n{output()[-3000:]}"
        try:
            if client.health(timeout=2)["serving"]:
                return
        except RequestError:
            time.sleep(0.5)


def stop(proc, timeout_s: float = 60) -> None:
    """SIGTERM a still-running subprocess, killing it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def assert_same_or_near_tie(eng, prompt, want, got):
    """Equal token for token; a divergence passes only where the target's top-2
    logit gap at that position (`eng`: an engine on the target, teacher-forced)
    is below 1e-5, a proven near-tie."""
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
    top2 = eng.logits(prompt + want[:i])[-1].topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap < 1e-5, f"diverged at token {i}: {want[i]} vs {got[i]}, top-2 gap {gap:.3g} is no near-tie"
