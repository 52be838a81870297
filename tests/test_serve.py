"""`specmoe serve` for real: a subprocess starts a local Ray instance (2 CPUs,
loopback, free ports), places the router actor, and serves the bundled tiny
MoE over gRPC; the tests talk to it with the real client, scrape Ray's
Prometheus endpoint, and end it with SIGTERM. One server for the module."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import pytest

from specmoe import Engine, SamplingParams
from specmoe.cluster.cli import main
from specmoe.cluster.client import Client, RequestError

from _helpers import assert_same_or_near_tie as near_tie  # noqa: E402  (tests/, on sys.path via conftest)
from _helpers import free_port, stop, wait_serving  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TOKEN = "serve-test-token"
MAX_SEQ_LEN = 512
PROMPTS = ['def read_config(path):\n    """Read a JSON file and return a dict."""\n',
           "class Stack:\n    def __init__(self):\n", "import os\nimport sys\n\n",
           "    for i, line in enumerate(lines):\n"]


class Served:
    def __init__(self, proc, port, metrics_port, log):
        self.proc, self.port, self.metrics_port, self.log = proc, port, metrics_port, log
        self.target = f"127.0.0.1:{port}"

    def client(self, token=TOKEN) -> Client:
        return Client(self.target, token=token)

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    port, mport = free_port(), free_port()
    cfg = d / "serve.yaml"
    cfg.write_text(f"server:\n  max_in_flight: 80\n  drain_timeout_s: 60\n"
                   f"engine:\n  max_batch: 16\n  max_seq_len: {MAX_SEQ_LEN}\n  speculation: auto\n"
                   f"ray:\n  num_cpus: 2\n  include_dashboard: false\n  metrics_export_port: {mport}\n")
    log = d / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "specmoe.cluster.cli", "serve", "--config", str(cfg),
                                 "--port", str(port), "--token", TOKEN], stdout=f, stderr=subprocess.STDOUT,
                                env=env)
    s = Served(proc, port, mport, log)
    try:
        with s.client() as c:
            wait_serving(c, proc, s.output, 180)
        yield s
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def reference():
    """The embedded engine on the same bundled model, without speculation."""
    return Engine.from_pretrained(None, max_batch=16, max_seq_len=MAX_SEQ_LEN, speculation="off")


def assert_same_or_near_tie(eng, prompt_ids, want, got):
    """Same length, and equal token for token except at a proven near-tie."""
    assert len(got) == len(want), (len(got), len(want))
    near_tie(eng, prompt_ids, want, got)


def _stream(c, prompt, **kw):
    chunks = list(c.generate(prompt, **kw))
    return [t for ch in chunks for t in ch.token_ids], chunks


def test_health_and_stats(served):
    with served.client() as c:
        h = c.health()
        assert h == {"serving": True, "model": "bundled:tiny-moe", "ep": 1, "speculation": "auto"}
        s = c.stats()
        assert s["kv_slots"] == 16 and s["max_in_flight"] == 80 and s["method"] == "ngram"


def test_greedy_stream_equals_engine_generate(served, reference):
    want = reference.generate(PROMPTS[:2], SamplingParams(max_tokens=40, ignore_eos=True))
    with served.client() as c:
        for p, w in zip(PROMPTS[:2], want):
            # Without speculation the server runs exactly the reference's computation.
            got, chunks = _stream(c, p, max_tokens=40, ignore_eos=True, speculation="off")
            assert got == w.token_ids
            assert "".join(ch.text for ch in chunks) == w.text
            assert chunks[0].prompt_tokens == len(w.prompt_token_ids) and chunks[-1].finish_reason == "length"
            assert [ch.finished for ch in chunks] == [False] * (len(chunks) - 1) + [True]
            # With the server's speculation ("auto") greedy output is the same (lossless).
            got, chunks = _stream(c, p, max_tokens=40, ignore_eos=True)
            assert_same_or_near_tie(reference, w.prompt_token_ids, w.token_ids, got)
            for ch in chunks[:-1]:   # every step commits accepted drafts + one token
                assert ch.accepted_tokens <= ch.draft_tokens and len(ch.token_ids) == ch.accepted_tokens + 1
        # Token-id prompts and a fixed n-gram k.
        ids = want[0].prompt_token_ids
        got, chunks = _stream(c, ids, max_tokens=40, ignore_eos=True, speculation={"method": "ngram", "k": 3})
        assert_same_or_near_tie(reference, ids, want[0].token_ids, got)
        assert max(ch.draft_tokens for ch in chunks) <= 3
        assert all(ch.draft_tokens <= ch.k <= 3 for ch in chunks)   # k: chosen, draft_tokens: proposed


def test_cancel_mid_stream_aborts_and_frees_kv(served):
    with served.client() as c:
        before = c.stats()
        assert before["kv_slots_used"] == 0
        stream = c.generate(PROMPTS[2], max_tokens=MAX_SEQ_LEN - 16, ignore_eos=True, speculation="off")
        n = sum(len(next(stream).token_ids) for _ in range(3))
        mid = c.stats()
        assert mid["kv_slots_used"] == 1 and mid["running"] == 1, mid
        stream.cancel()
        deadline = time.monotonic() + 10
        while True:
            s = c.stats()
            # The stream's handler thread lets go of its in-flight place just after the abort.
            if s["kv_slots_used"] == 0 and s["requests_aborted"] == before["requests_aborted"] + 1 \
                    and s["in_flight"] == 0:
                break
            assert time.monotonic() < deadline, f"KV not freed after cancel: {s}"
            time.sleep(0.05)
        assert s["requests_finished"] == before["requests_finished"]   # aborted, not run to the end
        assert n >= 3 and s["generated_tokens"] - before["generated_tokens"] < MAX_SEQ_LEN - 16


BAD = [
    ("empty text", dict(prompt=""), "prompt.text"),
    ("empty ids", dict(prompt=[]), "prompt.token_ids"),
    ("id outside vocab", dict(prompt=[1, 4096]), "prompt.token_ids[1]"),
    ("negative id", dict(prompt=[-1]), "prompt.token_ids[0]"),
    ("prompt longer than context", dict(prompt=[5] * (MAX_SEQ_LEN + 1)), "prompt:"),
    ("max_tokens 0", dict(prompt="x", max_tokens=0), "max_tokens"),
    ("max_tokens negative", dict(prompt="x", max_tokens=-3), "max_tokens"),
    ("max_tokens beyond context", dict(prompt="x", max_tokens=MAX_SEQ_LEN), "max_tokens"),
    ("temperature < 0", dict(prompt="x", temperature=-0.5), "temperature"),
    ("temperature nan", dict(prompt="x", temperature=float("nan")), "temperature"),
    ("top_p 0", dict(prompt="x", top_p=0.0), "top_p"),
    ("top_p > 1", dict(prompt="x", top_p=1.5), "top_p"),
    ("top_k < 0", dict(prompt="x", top_k=-1), "top_k"),
    ("unknown speculation method", dict(prompt="x", speculation="medusa"), "speculation.mode"),
    ("method the server does not run", dict(prompt="x", speculation="draft_model"), "speculation.mode"),
    ("speculation k out of range", dict(prompt="x", speculation={"method": "ngram", "k": 99}), "speculation.k"),
    ("malformed UTF-8", dict(prompt=b"def f(\xc3\x28):"), "prompt.text"),
    ("truncated UTF-8", dict(prompt=b"abc\xe2\x82"), "prompt.text"),
    ("empty stop string", dict(prompt="x", stop=[""]), "stop[0]"),
]


@pytest.mark.parametrize("case, kw, field", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_invalid_argument_naming_the_field(served, case, kw, field):
    with served.client() as c:
        prompt = kw.pop("prompt")
        with pytest.raises(RequestError) as e:
            list(c.generate(prompt, **kw))
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT, e.value
        assert e.value.details.startswith(field), e.value.details
        # ... and the server keeps serving.
        assert len(c.complete("def f():\n", max_tokens=3, ignore_eos=True).token_ids) == 3


def test_unauthenticated_without_the_token(served):
    for token in (None, "not-the-token"):
        with served.client(token=token) as c:
            with pytest.raises(RequestError) as e:
                c.complete("x", max_tokens=2)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with served.client() as c:
        assert c.health()["serving"]


def test_64_concurrent_streams_all_complete_correctly(served, reference):
    n = 64
    prompts = [PROMPTS[i % len(PROMPTS)] + f"    x{i} = {i}\n" for i in range(n)]
    want = reference.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True))
    got, errors = {}, []

    def run(i):
        try:
            with served.client() as c:
                # Half without speculation, half with the server's (greedy output is the same either way).
                got[i] = _stream(c, prompts[i], max_tokens=24, ignore_eos=True,
                                 speculation="off" if i % 2 else None)[0]
        except Exception as e:   # noqa: BLE001 - collected and reported below
            errors.append(f"{i}: {e!r}")
    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    assert len(got) == n
    for i in range(n):
        assert_same_or_near_tie(reference, want[i].prompt_token_ids, want[i].token_ids, got[i])


def grafana_series() -> set[str]:
    """Every ray_specmoe_* series the shipped Grafana dashboard queries."""
    import json
    from pathlib import Path
    dash = json.loads((Path(__file__).resolve().parents[1] / "cluster/grafana/specmoe-dashboard.json").read_text())
    return {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"\bray_specmoe_[a-z0-9_]+", t["expr"])}


def _scrape(port) -> dict[str, float]:
    """series name -> value summed over label sets (workers, tags)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^(ray_specmoe_[a-z0-9_]+)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", line)
        if m and m.group(3) != "NaN":
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def _labelled(port, name) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(rf'^{name}\{{.*position="(\d+)".*\}} ([0-9.eE+-]+)$', line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def test_metrics_on_rays_prometheus_endpoint_agree_with_the_client(served, reference):
    with served.client() as c:
        with pytest.raises(RequestError):   # a refused request is counted too
            c.complete("x", max_tokens=0)
        before = c.stats()
        streamed = drafted = accepted = 0
        # A repetitive prompt, so that n-gram drafts get accepted.
        for p in PROMPTS[:2] + ["a = 1\nb = 2\na = 1\nb = 2\na = 1\nb = 2\n"]:
            toks, chunks = _stream(c, p, max_tokens=32, ignore_eos=True, speculation={"method": "ngram", "k": 4})
            streamed += len(toks)
            drafted += sum(ch.draft_tokens for ch in chunks)
            accepted += sum(ch.accepted_tokens for ch in chunks)
        after = c.stats()
    # This workload is all the engine did meanwhile, and the stream told the client all of it.
    assert after["generated_tokens"] - before["generated_tokens"] == streamed
    assert after["draft_tokens"] - before["draft_tokens"] == drafted
    assert after["accepted_tokens"] - before["accepted_tokens"] == accepted
    assert 0 < accepted <= drafted
    # Ray exports every few seconds: poll until the counters reach the engine's totals.
    want = {"ray_specmoe_generated_tokens_total": after["generated_tokens"],
            "ray_specmoe_draft_tokens_total": after["draft_tokens"],
            "ray_specmoe_accepted_tokens_total": after["accepted_tokens"],
            "ray_specmoe_steps_total": after["steps"]}
    deadline = time.monotonic() + 60
    while True:
        m = _scrape(served.metrics_port)
        if all(m.get(k) == v for k, v in want.items()):
            break
        assert time.monotonic() < deadline, f"metrics never matched the engine: " \
            f"{ {k: m.get(k) for k in want} } vs {want}"
        time.sleep(1.0)
    assert m["ray_specmoe_accepted_tokens_total"] <= m["ray_specmoe_draft_tokens_total"]
    # Routing: one layer-step per MoE layer per step, each reading top_k..E distinct experts.
    moe = reference.config.moe
    layer_steps = m["ray_specmoe_moe_layer_steps_total"]
    assert layer_steps == after["steps"] * len(moe.layers)
    assert moe.top_k * layer_steps <= m["ray_specmoe_expert_loads_total"] <= moe.num_experts * layer_steps
    # All-to-all bytes exist only under expert parallelism (this server runs ep=1); the cost-model
    # error only once the engine's controller reports one.
    optional = {"ray_specmoe_a2a_bytes_total"} | (
        {"ray_specmoe_cost_model_error"} if after["cost_model_error"] is None else set())
    missing = grafana_series() - optional - set(m)
    assert not missing, f"series the Grafana dashboard queries but the server does not export: {sorted(missing)}"
    # Per position: accepted <= drafted everywhere, and the positions add up to the totals.
    acc = _labelled(served.metrics_port, "ray_specmoe_accepted_per_position_total")
    dra = _labelled(served.metrics_port, "ray_specmoe_drafted_per_position_total")
    assert all(acc[p] <= dra[p] for p in acc) and sum(acc.values()) == m["ray_specmoe_accepted_tokens_total"]
    assert sum(dra.values()) == m["ray_specmoe_draft_tokens_total"]
    assert m["ray_specmoe_requests_total"] >= after["requests_finished"]


def test_cli_generate_stats_and_bench_against_the_server(served, capsys, tmp_path):
    os.environ["SPECMOE_TOKEN"] = TOKEN
    try:
        assert main(["generate", "--target", served.target, "--max-tokens", "8", "--speculation", "off",
                     "--ignore-eos", PROMPTS[1]]) == 0
        out = capsys.readouterr()
        assert "[8 tokens, length" in out.err and out.out.strip()
        assert main(["stats", "--target", served.target]) == 0
        assert '"kv_slots": 16' in capsys.readouterr().out
        rows = tmp_path / "bench.json"
        assert main(["bench", "--target", served.target, "--concurrency", "1,4", "--requests", "4",
                     "--max-tokens", "16", "--speculation", "auto,off", "--json", str(rows)]) == 0
        out = capsys.readouterr()
        assert "4/4 requests" in out.err and "TPOT p50" in out.out
        import json
        res = json.loads(rows.read_text())["summary"]
        assert [(r["concurrency"], r["speculation"]) for r in res] == [(1, "auto"), (1, "off"), (4, "auto"),
                                                                      (4, "off")]
        for r in res:
            assert r["requests"] == 4 and not r["errors"] and r["generated_tokens"] == 4 * 16
            assert r["tokens_per_s"] > 0 and r["ttft_p50_s"] <= r["ttft_p99_s"]
        assert all(r["draft_tokens"] == 0 for r in res if r["speculation"] == "off")
    finally:
        del os.environ["SPECMOE_TOKEN"]


def test_sigterm_drains_in_flight_requests_then_exits_0(served):
    """Last in the module: it ends the server."""
    n_new = MAX_SEQ_LEN - 32
    got, err, done = [], [], threading.Event()
    first = threading.Event()

    def run():
        try:
            with served.client() as c:
                for ch in c.generate(PROMPTS[0], max_tokens=n_new, ignore_eos=True, speculation="off"):
                    got.extend(ch.token_ids)
                    first.set()
                    if ch.finished:
                        got.append(ch.finish_reason)
        except Exception as e:   # noqa: BLE001 - reported below
            err.append(e)
        finally:
            first.set()
            done.set()
    t = threading.Thread(target=run)
    t.start()
    assert first.wait(30)
    served.proc.send_signal(signal.SIGTERM)
    # The server stops accepting (Health says so, Generate is UNAVAILABLE) while the request runs on.
    deadline = time.monotonic() + 20
    with served.client() as c:
        while c.health(timeout=5)["serving"]:
            assert time.monotonic() < deadline, "server never started draining"
            time.sleep(0.02)
        in_flight_while_draining = not done.is_set()
        with pytest.raises(RequestError) as e:
            c.complete("x", max_tokens=2, timeout=10)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    assert in_flight_while_draining, "the request finished before the drain began; nothing was drained"
    t.join(60)
    assert not err, err
    assert len(got) == n_new + 1 and got[-1] == "length", got[-5:]   # it ran to its end
    assert served.proc.wait(60) == 0, served.output()[-3000:]
    assert "drained" in served.output()
