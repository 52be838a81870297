"""The Python client of `specmoe serve`.

    from specmoe import Client
    c = Client("127.0.0.1:50051", token=None)
    for chunk in c.generate("def f(x):", max_tokens=32):
        print(chunk.text, end="")
    c.stats()   # dict: queue, KV use, acceptance per position, chosen k, ...

A failed call raises `RequestError` with the gRPC status code and the
server's message (which names the field for INVALID_ARGUMENT).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import specmoe_pb2 as pb
from . import specmoe_pb2_grpc as pb_grpc


class RequestError(RuntimeError):
    """A call the server refused or that failed; `code` is a grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass
class Chunk:
    """What one engine step added to the request."""
    token_ids: list[int]
    text: str
    draft_tokens: int               # k drafted this step
    accepted_tokens: int
    finished: bool
    finish_reason: str | None
    prompt_tokens: int = 0          # set on the first chunk
    k: int = 0                      # draft length chosen this step (draft_tokens may be fewer)


@dataclass
class Generation:
    """A whole streamed generation, with client-side timings."""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    steps: int = 0                  # chunks received
    draft_tokens: int = 0
    accepted_tokens: int = 0
    chosen_k: int = 0               # sum over steps of the draft length chosen (Chunk.k)
    ttft_s: float | None = None     # request sent -> first token
    total_s: float = 0.0            # request sent -> last chunk

    @property
    def tpot_s(self) -> float | None:
        n = len(self.token_ids)
        return (self.total_s - self.ttft_s) / (n - 1) if self.ttft_s is not None and n > 1 else None


def _speculation(spec) -> pb.Speculation | None:
    """None (server's), "auto", "off", a method name, or {"method": m, "k": n}."""
    if spec is None:
        return None
    if isinstance(spec, str):
        return pb.Speculation(mode=spec)
    if isinstance(spec, dict):
        unknown = set(spec) - {"method", "k"}
        if unknown:
            raise ValueError(f"speculation: unknown keys {sorted(unknown)} (allowed: method, k)")
        s = pb.Speculation(mode=spec.get("method", "auto"))
        if "k" in spec:
            s.k = int(spec["k"])
        return s
    raise ValueError(f"speculation must be None, a string or a dict, got {spec!r}")


def build_request(prompt, max_tokens=None, temperature=None, top_p=None, top_k=None, seed=None, stop=(),
                  speculation=None, ignore_eos=False) -> pb.GenerateRequest:
    """prompt: str (sent as UTF-8), bytes (sent as is) or a list of token ids."""
    req = pb.GenerateRequest(stop=list(stop), ignore_eos=ignore_eos)
    if isinstance(prompt, str):
        req.text = prompt.encode("utf-8")
    elif isinstance(prompt, bytes):
        req.text = prompt
    else:
        req.token_ids.ids.extend(int(t) for t in prompt)
    for name, v in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                    ("top_k", top_k), ("seed", seed)):
        if v is not None:
            setattr(req, name, v)
    spec = _speculation(speculation)
    if spec is not None:
        req.speculation.CopyFrom(spec)
    return req


class Stream:
    """An iterator of Chunks; `cancel()` ends the request on the server (its KV cache is freed)."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        try:
            m = next(self._call)
        except grpc.RpcError as e:
            raise RequestError(e.code(), e.details()) from None
        return Chunk(list(m.token_ids), m.text, m.draft_tokens, m.accepted_tokens, m.finished,
                     m.finish_reason or None, m.prompt_tokens, m.k)

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    def __init__(self, target: str, token: str | None = None, root_certificates: bytes | str | Path | None = None,
                 tls: bool = False):
        """target "host:port". TLS when `tls` or root_certificates (PEM bytes or a file) is given; without
        root_certificates the system trust store verifies the server."""
        if isinstance(root_certificates, (str, Path)):
            root_certificates = Path(root_certificates).read_bytes()
        opts = [("grpc.max_receive_message_length", 64 << 20)]
        if tls or root_certificates is not None:
            self._channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates), opts)
        else:
            self._channel = grpc.insecure_channel(target, opts)
        self._stub = pb_grpc.SpecMoEStub(self._channel)
        self._md = (("authorization", f"Bearer {token}"),) if token else ()
        self.target = target

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unary(self, method, req, timeout):
        try:
            return method(req, metadata=self._md, timeout=timeout)
        except grpc.RpcError as e:
            raise RequestError(e.code(), e.details()) from None

    def generate(self, prompt, *, timeout: float | None = None, **sampling) -> Stream:
        """Stream the generation of `prompt` (str, bytes or token ids). sampling: max_tokens, temperature,
        top_p, top_k, seed, stop, speculation ("auto", "off", {"method": m, "k": n}), ignore_eos.
        `timeout` is the call's deadline in seconds."""
        req = build_request(prompt, **sampling)
        return Stream(self._stub.Generate(req, metadata=self._md, timeout=timeout))

    def complete(self, prompt, *, timeout: float | None = None, **sampling) -> Generation:
        """The whole generation, with TTFT and total time measured here."""
        import time
        g = Generation()
        t0 = time.perf_counter()
        for c in self.generate(prompt, timeout=timeout, **sampling):
            if c.prompt_tokens:
                g.prompt_tokens = c.prompt_tokens
            if c.token_ids and g.ttft_s is None:
                g.ttft_s = time.perf_counter() - t0
            g.token_ids += c.token_ids
            g.text += c.text
            g.steps += 1
            g.draft_tokens += c.draft_tokens
            g.accepted_tokens += c.accepted_tokens
            g.chosen_k += c.k
            if c.finished:
                g.finish_reason = c.finish_reason
        g.total_s = time.perf_counter() - t0
        return g

    def health(self, timeout: float | None = 10.0) -> dict:
        r = self._unary(self._stub.Health, pb.HealthRequest(), timeout)
        return {"serving": r.serving, "model": r.model, "ep": r.ep, "speculation": r.speculation}

    def stats(self, timeout: float | None = 10.0) -> dict:
        r = self._unary(self._stub.GetStats, pb.StatsRequest(), timeout)
        d = {f.name: getattr(r, f.name) for f in r.DESCRIPTOR.fields
             if f.name not in ("acceptance_per_position", "k_histogram", "tokens_per_rank", "extra_json",
                               "cost_model_error")}
        d["acceptance_per_position"] = list(r.acceptance_per_position)
        d["k_histogram"] = dict(sorted(r.k_histogram.items()))
        d["tokens_per_rank"] = list(r.tokens_per_rank)
        d["cost_model_error"] = r.cost_model_error if r.HasField("cost_model_error") else None
        d.update(json.loads(r.extra_json or "{}"))
        return d

    def wait_ready(self, timeout: float = 60.0) -> dict:
        """Poll Health until the server answers serving=True; RequestError(UNAVAILABLE) on timeout."""
        import time
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                h = self.health(timeout=2.0)
                if h["serving"]:
                    return h
            except RequestError as e:
                if e.code == grpc.StatusCode.UNAUTHENTICATED:
                    raise
                last = e
            time.sleep(0.2)
        raise RequestError(grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout}s ({last})")
