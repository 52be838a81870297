"""The `specmoe` command line.

    specmoe serve [--model PATH] [--port N] [--host H] [--ep N] [--config FILE] [--token T]
                  [--few-row-linears ROWS] ...
    specmoe generate --target HOST:PORT [--max-tokens N] PROMPT     (over gRPC)
    specmoe generate --model PATH --prompt P [--prompt P ...]       (embedded engine, no server)
    specmoe stats --target HOST:PORT
    specmoe bench --target HOST:PORT [--concurrency 1,4,16] [--requests N] [--prompts FILE]

The token, when the server wants one, comes from --token or $SPECMOE_TOKEN.
"""

import argparse
import json
import os
import sys
import time


FEW_ROWS_HELP = ("CPU float32: rows up to which dense weights go through prepared copies (transposed for 1 row, "
                 "oneDNN-packed for more, as are routed experts given 2 rows or more: faster decode and "
                 "verification, up to three times the dense weights' memory, twice the experts'); "
                 "1: transposed copies only; 0: no copies")


def _generate(a: argparse.Namespace) -> int:
    from ..router.engine import Engine, SamplingParams

    spec = a.speculation
    if spec not in ("off", "auto"):
        spec = {"method": spec, "k": a.k}
        if a.speculation == "draft_model":
            spec["draft_model"] = a.draft_model
        if a.speculation == "layer_skip":
            spec["layers"] = a.layers
    t0 = time.perf_counter()
    eng = Engine.from_pretrained(a.model, device=a.device, dtype=a.dtype, max_batch=max(len(a.prompt), 1),
                                 max_seq_len=a.max_seq_len, speculation=spec, few_row_linears=a.few_row_linears)
    c = eng.config
    moe = f"{c.moe.num_experts} experts top-{c.moe.top_k} in {len(c.moe.layers)} layers" if c.moe else "dense"
    print(f"loaded {c.architecture} ({c.num_layers} layers, hidden {c.hidden_size}, {moe}) "
          f"as {a.dtype} on {a.device} in {time.perf_counter() - t0:.2f}s", flush=True)
    t0 = time.perf_counter()
    outs = eng.generate(a.prompt, SamplingParams(max_tokens=a.max_tokens, ignore_eos=a.ignore_eos,
                                                 temperature=a.temperature, seed=a.seed))
    dt = time.perf_counter() - t0
    for p, o in zip(a.prompt, outs):
        st = o.stats
        print(f"\n> {p}\n{o.text if o.text is not None else o.token_ids}\n  [{len(o.token_ids)} tokens, "
              f"{o.finish_reason}; {st.steps} steps, {st.accepted_tokens}/{st.draft_tokens} drafts accepted]")
    n = sum(len(o.token_ids) for o in outs)
    mode = "greedy" if a.temperature == 0 else f"temperature {a.temperature}"
    print(f"\n{n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s, {mode}, batch {len(outs)}, "
          f"speculation {a.speculation})")
    return 0


def _client(a: argparse.Namespace):
    from .client import Client
    return Client(a.target, token=a.token or os.environ.get("SPECMOE_TOKEN"), root_certificates=a.tls_ca,
                  tls=a.tls)


def _spec_arg(a: argparse.Namespace):
    if a.speculation in (None, "auto", "off"):
        return a.speculation
    return {"method": a.speculation, **({"k": a.k} if a.k is not None else {})}


def _generate_remote(a: argparse.Namespace) -> int:
    prompts = (a.prompt or []) + (a.prompts or [])
    if not prompts:
        raise ValueError("generate: give a PROMPT")
    with _client(a) as c:
        for p in prompts:
            if len(prompts) > 1:
                print(f"> {p}")
            drafted = accepted = n = steps = 0
            t0 = time.perf_counter()
            for ch in c.generate(p, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                                 speculation=_spec_arg(a), ignore_eos=a.ignore_eos, timeout=a.timeout):
                print(ch.text, end="", flush=True)
                drafted, accepted = drafted + ch.draft_tokens, accepted + ch.accepted_tokens
                n, steps = n + len(ch.token_ids), steps + 1
                reason = ch.finish_reason
            dt = time.perf_counter() - t0
            print(f"\n  [{n} tokens, {reason}; {steps} steps, {accepted}/{drafted} drafts accepted, "
                  f"{n / dt:.1f} tokens/s]", file=sys.stderr)
    return 0


def _serve(a: argparse.Namespace) -> int:
    from .config import load_config
    from .serve import run
    over = {"server.host": a.host, "server.port": a.port, "server.token": a.token or os.environ.get("SPECMOE_TOKEN"),
            "server.tls_cert": a.tls_cert, "server.tls_key": a.tls_key, "server.max_in_flight": a.max_in_flight,
            "server.drain_timeout_s": a.drain_timeout,
            "engine.model": a.model, "engine.ep": a.ep, "engine.device": a.device, "engine.dtype": a.dtype,
            "engine.max_batch": a.max_batch, "engine.max_seq_len": a.max_seq_len, "engine.speculation": a.speculation,
            "engine.few_row_linears": a.few_row_linears,
            "ray.address": a.address, "ray.num_cpus": a.num_cpus, "ray.metrics_export_port": a.metrics_export_port,
            "ray.include_dashboard": False if a.no_dashboard else None}
    return run(load_config(a.config, over))


def _stats(a: argparse.Namespace) -> int:
    with _client(a) as c:
        print(json.dumps(c.stats(), indent=2, sort_keys=True))
    return 0


def _bench(a: argparse.Namespace) -> int:
    from .bench import format_results, load_prompts, run_grid, summarize
    specs = [None if x == "server" else x for x in a.speculation.split(",")]
    runs = run_grid(a.target, [int(x) for x in a.concurrency.split(",")], specs, rounds=a.rounds,
                    requests=a.requests, max_tokens=a.max_tokens, prompts=load_prompts(a.prompts),
                    temperature=a.temperature, token=a.token or os.environ.get("SPECMOE_TOKEN"),
                    root_certificates=a.tls_ca, progress=not a.no_progress)
    rows = summarize(runs)
    if a.rounds > 1:
        print(f"medians over {a.rounds} interleaved rounds")
    print(format_results(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"summary": rows, "runs": runs}, f, indent=2)
    return 1 if any(r["errors"] for r in rows) else 0


def _add_target(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--target", required=required, help="HOST:PORT of a specmoe server")
    p.add_argument("--token", help="bearer token (default: $SPECMOE_TOKEN)")
    p.add_argument("--tls", action="store_true", help="TLS, verified with the system trust store")
    p.add_argument("--tls-ca", help="PEM file of the CA (or self-signed cert) that signed the server's cert")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specmoe", description="Serve MoE models with cost-aware speculation.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve a checkpoint over gRPC on Ray (local instance or --address auto)")
    s.add_argument("--config", help="YAML or TOML file (cluster/config.py: server, engine, ray); flags override it")
    s.add_argument("--model", help="checkpoint directory (default: the bundled tiny MoE)")
    s.add_argument("--host", help="interface to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    s.add_argument("--ep", type=int, help="expert-parallel degree (default 1)")
    s.add_argument("--token", help="require this bearer token (default: $SPECMOE_TOKEN if set)")
    s.add_argument("--tls-cert", help="PEM certificate chain; with --tls-key serves TLS")
    s.add_argument("--tls-key", help="PEM private key")
    s.add_argument("--max-in-flight", type=int, help="open streams at most; beyond: RESOURCE_EXHAUSTED")
    s.add_argument("--drain-timeout", type=float, help="seconds SIGTERM waits for in-flight requests")
    s.add_argument("--device", help="cpu or cuda")
    s.add_argument("--dtype", choices=["float32", "bfloat16"])
    s.add_argument("--max-batch", type=int, help="KV-cache slots (requests running at once)")
    s.add_argument("--max-seq-len", type=int, help="context per request")
    s.add_argument("--speculation", help="auto | off (default auto)")
    s.add_argument("--few-row-linears", type=int, metavar="ROWS", help=FEW_ROWS_HELP + " (default 3)")
    s.add_argument("--address", help="Ray cluster to join (auto, or HOST:PORT); default: start a local one")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance")
    s.add_argument("--metrics-export-port", type=int, help="Prometheus port of the local Ray instance (default 8080)")
    s.add_argument("--no-dashboard", action="store_true", help="local Ray instance without the dashboard")

    g = sub.add_parser("generate", help="generate over gRPC (--target) or with the embedded engine (--model)")
    g.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt(s)")
    _add_target(g, required=False)
    g.add_argument("--timeout", type=float, help="deadline of each call in seconds (--target)")
    g.add_argument("--model", help="checkpoint directory for the embedded engine (without --target)")
    g.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--max-seq-len", type=int, default=1024)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculation", default=None, choices=["off", "auto", "ngram", "draft_model", "layer_skip"],
                   help="embedded default: off; --target default: the server's")
    g.add_argument("--k", type=int, default=None, help="draft tokens per step")
    g.add_argument("--draft-model", help="draft checkpoint for --speculation draft_model")
    g.add_argument("--layers", type=int, default=1, help="first layers used by --speculation layer_skip")
    g.add_argument("--few-row-linears", type=int, metavar="ROWS", help=FEW_ROWS_HELP + " (default 3)")

    st = sub.add_parser("stats", help="the server's monitoring snapshot (JSON)")
    _add_target(st)

    b = sub.add_parser("bench", help="load generator over gRPC: TTFT/TPOT p50/p99, tokens/s, acceptance")
    _add_target(b)
    b.add_argument("--concurrency", default="4", help="streams at once; a comma list runs each (e.g. 1,4,16)")
    b.add_argument("--requests", type=int, help="requests per run (default: max(prompts, 2 x concurrency))")
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--prompts", help="prompt set: text (one per line), .json list or .jsonl {prompt}")
    b.add_argument("--speculation", default="server", help="comma list of auto, off, server (the server's)")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--rounds", type=int, default=1, help="repeat the whole grid, interleaved; report medians")
    b.add_argument("--json", help="also write the results here ({summary, runs})")
    b.add_argument("--no-progress", action="store_true")

    a = ap.parse_args(argv)
    try:
        if a.command == "serve":
            return _serve(a)
        if a.command == "stats":
            return _stats(a)
        if a.command == "bench":
            return _bench(a)
        if a.target:
            return _generate_remote(a)
        if not a.model:
            ap.error("generate: --model DIR (embedded engine) or --target HOST:PORT (a server)")
        a.prompt = (a.prompt or []) + a.prompts
        if not a.prompt:
            ap.error("generate: give a prompt")
        a.speculation = a.speculation or "off"
        a.k = 4 if a.k is None else a.k
        return _generate(a)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"specmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
