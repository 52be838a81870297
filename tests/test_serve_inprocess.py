"""The gRPC service in-process (no Ray), on loopback with real gRPC: TLS with
a self-signed certificate, the bearer token, the bounded queue, deadlines.
The Ray path (`specmoe serve`) is tests/test_serve.py."""

import datetime
import ipaddress
import threading
import time

import grpc
import pytest

from specmoe.cluster.client import Client, RequestError
from specmoe.cluster.config import ServerConfig
from specmoe.cluster.router_actor import build_engine
from specmoe.cluster.config import EngineConfig
from specmoe.cluster.server import serve_engine

pytestmark = pytest.mark.usefixtures("one_thread")
TOKEN = "t0ken-for-tests"
LONG = dict(max_tokens=480, ignore_eos=True, speculation="off")   # ~1-2 s on the bundled model


def _self_signed(tmp_path):
    crypto = pytest.importorskip("cryptography", reason="cryptography makes the self-signed test certificate")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    c, k = tmp_path / "cert.pem", tmp_path / "key.pem"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return c, k


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    eng = build_engine(EngineConfig(max_batch=4, max_seq_len=512))
    srv = serve_engine(eng, ServerConfig(port=0, token=TOKEN, tls_cert=str(cert), tls_key=str(key),
                                         max_in_flight=2))
    yield srv, cert
    srv.drain(5.0)
    srv.loop.stop()


def _client(server, token=TOKEN):
    srv, cert = server
    return Client(f"localhost:{srv.port}", token=token, root_certificates=cert)


def _wait_idle(c, aborted_before, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = c.stats()
        if s["kv_slots_used"] == 0 and s["running"] == 0 and s["requests_aborted"] > aborted_before:
            return s
        time.sleep(0.05)
    raise AssertionError(f"request not aborted / KV not freed: {s}")


def test_binds_loopback_by_default(server):
    assert ServerConfig().host == "127.0.0.1"
    assert server[0].cfg.host == "127.0.0.1"


def test_tls_and_token(server):
    with _client(server) as c:
        g = c.complete("def f(x):\n", max_tokens=8)
        assert len(g.token_ids) == 8 and g.finish_reason == "length"
    for token in (None, "wrong"):
        with _client(server, token=token) as c:
            with pytest.raises(RequestError) as e:
                c.complete("x", max_tokens=2)
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED, e.value
            with pytest.raises(RequestError) as e:
                c.stats()
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    # A plaintext client cannot talk to the TLS server.
    with Client(f"localhost:{server[0].port}", token=TOKEN) as c:
        with pytest.raises(RequestError) as e:
            c.complete("x", max_tokens=2, timeout=5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_full_queue_is_resource_exhausted_and_server_recovers(server):
    with _client(server) as c:
        aborted = c.stats()["requests_aborted"]
        streams = [c.generate("import os\n", **LONG) for _ in range(2)]
        for s in streams:
            next(s)            # both admitted and running
        with pytest.raises(RequestError) as e:
            c.complete("x", max_tokens=2)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_in_flight" in e.value.details
        assert c.stats()["in_flight"] == 2
        for s in streams:
            s.cancel()
        _wait_idle(c, aborted + 1)
        deadline = time.monotonic() + 5
        while c.stats()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(c.complete("class A:\n", max_tokens=4).token_ids) == 4


def test_deadline_is_honoured_and_frees_the_kv_cache(server):
    with _client(server) as c:
        aborted = c.stats()["requests_aborted"]
        got = []
        t0 = time.monotonic()
        with pytest.raises(RequestError) as e:
            for ch in c.generate("import os\n", timeout=0.4, **LONG):
                got += ch.token_ids
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0 and 0 < len(got) < LONG["max_tokens"]
        s = _wait_idle(c, aborted)
        assert s["requests_aborted"] == aborted + 1


def test_concurrent_clients_share_the_engine(server):
    """Two streams at once interleave on the engine thread; each gives what it gives alone."""
    prompts, out = ["def a():\n", "class B:\n"], {}

    def run(i):
        with _client(server) as c:
            out[i] = c.complete(prompts[i], max_tokens=24, speculation="off").token_ids
    ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    with _client(server) as c:
        alone = [c.complete(p, max_tokens=24, speculation="off").token_ids for p in prompts]
    assert [out[0], out[1]] == alone and all(alone)
