"""`specmoe serve --ep 2`: the router actor builds the engine with
Engine.from_pretrained(ep=2), whose runner places two EP workers on the same
local Ray instance; greedy output over gRPC equals the single-process engine,
expert load is reported per rank, and SIGTERM still drains and exits 0."""

import os
import signal
import subprocess
import sys

import pytest

from specmoe import Engine, SamplingParams
from specmoe.cluster.client import Client

from _helpers import free_port, stop, wait_serving  # noqa: E402  (tests/, on sys.path via conftest)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
PROMPT = "class Stack:\n    def __init__(self):\n"


def test_serve_with_expert_parallelism(tmp_path):
    pytest.importorskip("specmoe.experts.ep_runner", reason="no EP runner in this build")
    port = free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # 4 logical CPUs: the router actor takes 1, each EP worker at most 1.
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "specmoe.cluster.cli", "serve", "--ep", "2", "--port", str(port),
                                 "--num-cpus", "4", "--no-dashboard", "--metrics-export-port", str(free_port()),
                                 "--max-seq-len", "256", "--max-batch", "4"],
                                stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        c = Client(f"127.0.0.1:{port}")
        wait_serving(c, proc, log.read_text, 240)
        assert c.health()["ep"] == 2
        ref = Engine.from_pretrained(None, max_batch=1, max_seq_len=256, speculation="off")
        want = ref.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
        got = c.complete(PROMPT, max_tokens=24, ignore_eos=True, speculation="off").token_ids
        assert got == want
        ranks = c.stats()["tokens_per_rank"]
        assert len(ranks) == 2 and all(n > 0 for n in ranks), ranks
        c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, log.read_text()[-3000:]
        assert "drained" in log.read_text()
    finally:
        stop(proc)
