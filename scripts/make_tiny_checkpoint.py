#!/usr/bin/env python
"""Write a tiny random-weight MoE checkpoint in the Hugging Face Mixtral layout
(config.json, model.safetensors, generation_config.json, tokenizer.json), using
only safetensors and tokenizers: what ./scripts/demo runs until the trained
bundled model exists. Its text is gibberish by construction (random weights).

    python scripts/make_tiny_checkpoint.py OUT_DIR [--layers 4 --hidden 256 --experts 16 --top-k 2]
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = [
    "Mixture-of-Experts models route every token to a few experts.",
    "Speculative decoding drafts tokens cheaply and verifies them in one pass.",
    "Expert parallelism spreads the experts of each layer over several devices.",
    "The quick brown fox jumps over the lazy dog.",
]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(512)
    V = tok.get_vocab_size()
    tok.save(str(a.out / "tokenizer.json"))
    D, F, E, d = a.hidden, a.ffn, a.experts, a.hidden // a.heads
    g = torch.Generator().manual_seed(a.seed)

    def w(*shape, std=None):
        return (torch.randn(*shape, generator=g) * (std or shape[-1] ** -0.5)).contiguous()

    t = {"model.embed_tokens.weight": w(V, D, std=1.0), "model.norm.weight": torch.ones(D),
         "lm_head.weight": w(V, D)}
    for i in range(a.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.ones(D)
        t[p + "post_attention_layernorm.weight"] = torch.ones(D)
        t[p + "self_attn.q_proj.weight"] = w(a.heads * d, D)
        t[p + "self_attn.k_proj.weight"] = w(a.kv_heads * d, D)
        t[p + "self_attn.v_proj.weight"] = w(a.kv_heads * d, D)
        t[p + "self_attn.o_proj.weight"] = w(D, a.heads * d)
        t[p + "block_sparse_moe.gate.weight"] = w(E, D)
        for e in range(E):
            q = f"{p}block_sparse_moe.experts.{e}."
            t[q + "w1.weight"], t[q + "w3.weight"], t[q + "w2.weight"] = w(F, D), w(F, D), w(D, F)
    save_file(t, str(a.out / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V, "hidden_size": D,
        "intermediate_size": F, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads, "num_local_experts": E, "num_experts_per_tok": a.top_k,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32",
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    (a.out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}))
    print(f"wrote {a.out}: Mixtral layout, {a.layers} layers, {E} experts top-{a.top_k}, vocab {V}")


if __name__ == "__main__":
    main()
