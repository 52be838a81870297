#!/usr/bin/env python
"""Train the bundled tiny models: a small Mixtral-style MoE target and a
smaller dense Llama draft, sharing one byte-level BPE tokenizer, on the
Python standard library's own sources (present offline on every machine).

    python scripts/train_tiny.py --out experts/bundled --minutes 25 --seed 0

Writes <out>/tiny-moe/ and <out>/tiny-draft/ (bf16 safetensors, config.json,
generation_config.json, tokenizer.json) and <out>/TRAINING.md.

Corpus: every *.py under sysconfig.get_paths()["stdlib"], excluding any
directory named test/tests/idlelib/site-packages, sorted by relative path.
Every 20th file (index % 20 == 0) is held out for evaluation.

Training is by wall-clock budget (--minutes, split --target-frac for the
target, the rest for the draft), so the number of steps depends on the
machine. Everything else (data order, init, tokenizer) is fixed by --seed;
pass --target-steps/--draft-steps to reproduce a run step for step (the
steps taken are recorded in TRAINING.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

EOS = "<|endoftext|>"
EXCLUDE_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
HOLDOUT_EVERY = 20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def corpus_files() -> tuple[list[Path], list[Path], Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts[:-1]) & EXCLUDE_DIRS)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    train = [p for i, p in enumerate(files) if i % HOLDOUT_EVERY != 0]
    held = [p for i, p in enumerate(files) if i % HOLDOUT_EVERY == 0]
    return train, held, root


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts: list[str], eos_id: int) -> torch.Tensor:
    out: list[int] = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos_id)
    return torch.tensor(out, dtype=torch.long)


def make_target(vocab: int, eos_id: int, seq_len: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=16,
        num_experts_per_tok=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        output_router_logits=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        sliding_window=None,
    )
    return MixtralForCausalLM(cfg)


def make_draft(vocab: int, eos_id: int, seq_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    return LlamaForCausalLM(cfg)


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * warm * (0.1 + 0.9 * cos)


def train_model(name, model, stream, args, seconds, max_steps, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    L, B = args.seq_len, args.batch
    n = stream.numel() - L - 1
    t0 = time.time()
    last_log = t0
    step = 0
    ema = None
    tokens = 0
    max_steps_given = max_steps
    while True:
        elapsed = time.time() - t0
        if max_steps is None and step == 10:
            # Fix the step count from the measured speed so the schedule is step based
            # (and the run reproducible with --*-steps).
            max_steps = max(11, int(seconds / (elapsed / 10)))
            log(f"{name}: {elapsed / 10:.2f} s/step -> {max_steps} steps")
        if max_steps is not None and step >= max_steps:
            break
        # Step-based schedule; if the machine slows down (other load), the wall clock takes over
        # so that the cosine still finishes within the budget.
        progress = max(step / max_steps if max_steps is not None else 0.0,
                       elapsed / seconds if max_steps_given is None else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(step, progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, n, (B,), generator=g)
        batch = torch.stack([stream[s : s + L + 1] for s in starts.tolist()])
        x, y = batch[:, :-1], batch[:, 1:]
        out = model(input_ids=x)
        logits = out.logits
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss = lm_loss
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            loss = loss + model.config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += B * L
        v = lm_loss.item()
        ema = v if ema is None else 0.95 * ema + 0.05 * v
        now = time.time()
        if now - last_log >= args.log_every or step == 1:
            extra = f" aux {aux.item():.3f}" if aux is not None else ""
            log(f"{name} step {step} t={now - t0:.0f}s lr {lr:.2e} loss {v:.3f} (ema {ema:.3f}){extra} "
                f"{tokens / (now - t0):.0f} tok/s")
            last_log = now
    wall = time.time() - t0
    log(f"{name} done: {step} steps, {tokens} tokens, {wall:.0f}s, final train loss (ema) {ema:.3f}")
    model.eval()
    return {"steps": step, "tokens": tokens, "wall_s": wall, "final_loss": ema}


@torch.no_grad()
def heldout_ppl(model, stream: torch.Tensor, seq_len: int, n_seqs: int) -> tuple[float, int]:
    model.eval()
    n_avail = (stream.numel() - 1) // seq_len
    n = min(n_seqs, n_avail)
    idx = [int(i * n_avail / n) for i in range(n)]  # evenly spaced, non-overlapping windows
    total, count = 0.0, 0
    for j in range(0, n, 16):
        rows = torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in idx[j : j + 16]])
        logits = model(input_ids=rows[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += rows[:, 1:].numel()
    return math.exp(total / count), n


def save(model, tok, eos_id: int, path: Path) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    tok.save(str(path / "tokenizer.json"))
    # Also make it loadable with transformers' AutoTokenizer.
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=EOS, pad_token=EOS)
    fast.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))  # keep the exact tokenizers file


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="experts/bundled")
    ap.add_argument("--minutes", type=float, default=25.0, help="total training wall time for both models")
    ap.add_argument("--target-frac", type=float, default=0.7)
    ap.add_argument("--target-steps", type=int, default=None, help="train the target for exactly N steps")
    ap.add_argument("--draft-steps", type=int, default=None, help="train the draft for exactly N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-seqs", type=int, default=300)
    ap.add_argument("--log-every", type=float, default=30.0)
    ap.add_argument("--max-mb", type=float, default=25.0)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)

    train_files, held_files, root = corpus_files()
    train_texts = [read(p) for p in train_files]
    held_texts = [read(p) for p in held_files]
    log(f"corpus: {root}: {len(train_files)} train files ({sum(map(len, train_texts)) / 1e6:.1f} MB), "
        f"{len(held_files)} held-out files ({sum(map(len, held_texts)) / 1e6:.1f} MB)")

    tok = train_tokenizer(train_texts, args.vocab)
    eos_id = tok.token_to_id(EOS)
    vocab = tok.get_vocab_size()
    sample = held_texts[0][:2000]
    assert tok.decode(tok.encode(sample).ids) == sample, "tokenizer does not round-trip"
    log(f"tokenizer: vocab {vocab}, eos id {eos_id} ({time.time() - t_start:.0f}s)")

    train_stream = encode_stream(tok, train_texts, eos_id)
    held_stream = encode_stream(tok, held_texts, eos_id)
    log(f"tokens: train {train_stream.numel()}, held-out {held_stream.numel()} "
        f"({sum(map(len, train_texts)) / train_stream.numel():.2f} chars/token)")

    budget = args.minutes * 60.0
    results = {}
    for name, make, frac, steps, seed_off in (
        ("tiny-moe", make_target, args.target_frac, args.target_steps, 1),
        ("tiny-draft", make_draft, 1.0 - args.target_frac, args.draft_steps, 2),
    ):
        torch.manual_seed(args.seed * 1000 + seed_off)
        model = make(vocab, eos_id, args.seq_len).float()
        nparams = sum(p.numel() for p in model.parameters())
        log(f"{name}: {type(model).__name__}, {nparams / 1e6:.2f}M params, budget {budget * frac:.0f}s")
        stats = train_model(name, model, train_stream, args, budget * frac, steps, args.seed * 1000 + seed_off)
        ppl_f32, n = heldout_ppl(model, held_stream, args.seq_len, args.eval_seqs)
        model = model.to(torch.bfloat16).float()  # what ships: bf16 weights
        ppl_bf16, _ = heldout_ppl(model, held_stream, args.seq_len, args.eval_seqs)
        log(f"{name}: held-out perplexity {ppl_bf16:.2f} (bf16 weights; {ppl_f32:.2f} before rounding) "
            f"on {n} x {args.seq_len} tokens")
        save(model, tok, eos_id, out / name)
        size = dir_size(out / name)
        log(f"{name}: saved to {out / name} ({size / 1e6:.2f} MB)")
        results[name] = dict(stats, params=nparams, ppl=ppl_bf16, ppl_f32=ppl_f32, eval_seqs=n, size=size,
                             arch=type(model).__name__)
        del model

    total = sum(r["size"] for r in results.values())
    log(f"total size {total / 1e6:.2f} MB (limit {args.max_mb} MB)")
    wall = time.time() - t_start
    cmd = "python scripts/train_tiny.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Bundled tiny models",
        "",
        "`tiny-moe/` (MixtralForCausalLM target) and `tiny-draft/` (LlamaForCausalLM draft) share one",
        "byte-level BPE tokenizer (`tokenizer.json`, EOS `<|endoftext|>`). Weights are bfloat16 safetensors.",
        "They were trained by `scripts/train_tiny.py` on the CPython standard library's own `*.py` sources",
        f"(excluding test/tests/idlelib/site-packages directories; every {HOLDOUT_EVERY}th file, sorted by path,",
        "held out for evaluation). They are toys for tests and demos, not useful language models.",
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch.set_num_threads({args.threads}), torch {torch.__version__}, "
        f"Python {platform.python_version()}",
        f"- corpus: {len(train_files)} train files / {len(held_files)} held-out files; "
        f"{train_stream.numel()} / {held_stream.numel()} tokens; vocab {vocab}",
        f"- sequence length {args.seq_len}, batch {args.batch}, AdamW lr {args.lr} (warmup {args.warmup} steps, "
        f"cosine to 10% over the wall-clock budget), seed {args.seed}",
        f"- total wall time (tokenizer, training, eval, saving): {wall / 60:.1f} min",
        "",
        "| model | arch | params | steps | train tokens | train time | final train loss | held-out ppl | size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['arch']} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['tokens']} | "
            f"{r['wall_s'] / 60:.1f} min | {r['final_loss']:.3f} | {r['ppl']:.2f} | {r['size'] / 1e6:.2f} MB |"
        )
    lines += [
        "",
        f"Held-out perplexity: {results['tiny-moe']['eval_seqs']} evenly spaced non-overlapping windows of "
        f"{args.seq_len} tokens from the held-out files, with the saved bf16 weights upcast to float32.",
        f"Reproduce (step counts as above; exact unless the wall clock cut the schedule short): `python scripts/train_tiny.py --out {args.out} --seed {args.seed} "
        f"--target-steps {results['tiny-moe']['steps']} --draft-steps {results['tiny-draft']['steps']}`"
        + (f" --seq-len {args.seq_len} --batch {args.batch}" if (args.seq_len, args.batch) != (256, 16) else ""),
        "",
    ]
    (out / "TRAINING.md").write_text("\n".join(lines))
    log(f"wrote {out / 'TRAINING.md'}; total wall {wall / 60:.1f} min")
    if total > args.max_mb * 1e6:
        log(f"ERROR: bundled models are {total / 1e6:.2f} MB > {args.max_mb} MB")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
