"""Build the "moe-bench" checkpoint: random weights in Mixtral format.

    .venv/bin/python scripts/make_moe_bench.py OUT_DIR [--seed 0]

8 layers, hidden 512, 32 experts top-2 with expert FFN 512, 8 query / 2 KV
heads (head_dim 64), vocab 8192, written by transformers'
MixtralForCausalLM.save_pretrained (transformers is a test extra; specmoe
itself never imports it). The weights depend only on the seed, so a directory
built earlier with the same seed is reused as is.

build_dense_checkpoint ("dense-bench": a LlamaForCausalLM with the same active
parameters per token, MLP 1024 = 2 experts x 512) and build_draft_checkpoint
("draft-bench": 2 layers, hidden 256, same vocabulary) are for
scripts/bench_spec.py; this command line builds moe-bench only.
"""

import argparse
import json
import sys
from pathlib import Path

MOE_BENCH = dict(num_local_experts=32, num_experts_per_tok=2, intermediate_size=512, hidden_size=512,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)
_STAMP = "moe_bench.json"   # what built this directory: config and seed
# "dense-bench": a Llama with moe-bench's active parameters per token (attention, norms, embeddings and LM
# head alike; one MLP of 2 x 512 = the two routed experts of 512), for the MoE-vs-dense comparisons.
DENSE_BENCH = dict(intermediate_size=1024, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=8192)
# "draft-bench": a small Llama with moe-bench's vocabulary, the draft model of draft-model speculation.
DRAFT_BENCH = dict(intermediate_size=512, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=8192)


def build_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """Write the moe-bench checkpoint to `out` (float32) unless the same one is already there."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    out = Path(out)
    stamp = {"config": MOE_BENCH, "seed": seed}
    if (out / _STAMP).exists() and (out / "config.json").exists():
        try:
            if json.loads((out / _STAMP).read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = MixtralConfig(**MOE_BENCH, max_position_embeddings=4096, dtype="float32")
    model = MixtralForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out)
    (out / _STAMP).write_text(json.dumps(stamp))
    return out


def _build_llama(out: str | Path, config: dict, seed: int) -> Path:
    """Write a random LlamaForCausalLM (float32, seeded like build_checkpoint) unless the same one is there."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    stamp = {"architecture": "LlamaForCausalLM", "config": config, "seed": seed}
    if (out / _STAMP).exists() and (out / "config.json").exists():
        try:
            if json.loads((out / _STAMP).read_text()) == stamp:
                return out
        except json.JSONDecodeError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config, max_position_embeddings=4096, dtype="float32"))
    model.to(torch.float32).eval().save_pretrained(out)
    (out / _STAMP).write_text(json.dumps(stamp))
    return out


def build_dense_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """Write "dense-bench" (DENSE_BENCH, LlamaForCausalLM) to `out` unless the same one is already there."""
    return _build_llama(out, DENSE_BENCH, seed)


def build_draft_checkpoint(out: str | Path, seed: int = 0) -> Path:
    """Write "draft-bench" (DRAFT_BENCH, LlamaForCausalLM) to `out` unless the same one is already there."""
    return _build_llama(out, DRAFT_BENCH, seed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_checkpoint(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
