"""Build the "moe-bench" checkpoint: random weights in Mixtral format.

    .venv/bin/python scripts/make_moe_bench.py OUT_DIR [--seed 0]

8 layers, hidden 512, 32 experts top-2 with expert FFN 512, 8 query / 2 KV
heads (head_dim 64), vocab 8192, written by transformers'
MixtralForCausalLM.save_pretrained (transformers is a test extra; specmoe
itself never imports it). The weights depend only on the seed, so a directory
built earlier with the same seed is reused as is.
"""

import argparse
import json
import sys
from pathlib import Path

MOE_BENCH = dict(num_local_experts=32, num_experts_per_tok=2, intermediate_size=512, hidden_size=512,
                 num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, vocab_size=8192)
_STAMP = "moe_bench.json"   # what built this directory: config and seed


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(build_checkpoint(args.out, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
