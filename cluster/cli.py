"""The `specmoe` command line. `specmoe generate` runs the embedded engine on a
local checkpoint, with or without speculation; serving over gRPC
(`specmoe serve`) comes with the serving issue."""

import argparse
import sys
import time


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
                                 max_seq_len=a.max_seq_len, speculation=spec)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="specmoe", description="Serve MoE models with cost-aware speculation.")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="greedy generation from a local Hugging Face checkpoint directory")
    g.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    g.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    g.add_argument("--max-seq-len", type=int, default=1024)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--speculation", default="off", choices=["off", "auto", "ngram", "draft_model", "layer_skip"])
    g.add_argument("--k", type=int, default=4, help="draft tokens per step")
    g.add_argument("--draft-model", help="draft checkpoint for --speculation draft_model")
    g.add_argument("--layers", type=int, default=1, help="first layers used by --speculation layer_skip")
    a = ap.parse_args(argv)
    try:
        return _generate(a)
    except (ValueError, RuntimeError) as e:
        print(f"specmoe: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
