"""The embedded engine: load a checkpoint, teacher-forced logits, and greedy
generation over a ragged batch with the KV cache.

Ownership: the Engine owns the sequences (their tokens and cached lengths);
the ModelRunner owns the weights and the cache tensors and is told, each step,
which chunk of which sequence to append.
"""

from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import torch

from ..experts.batch import Chunk
from ..experts.runner import ModelRunner
from ..kernels.sampling import greedy


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int = 16            # new tokens per prompt at most
    temperature: float = 0.0        # 0: greedy (the only mode of the foundation engine)
    ignore_eos: bool = False        # keep going past end-of-sequence tokens
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a sequence (kept in the output)

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature != 0.0:
            raise ValueError("temperature > 0 (sampling) is not available yet; use temperature=0.0")


@dataclass
class CompletionStats:
    steps: int = 0                  # forwards this sequence took part in (prefill included)
    draft_tokens: int = 0           # speculative tokens proposed (0 without speculation)
    accepted_tokens: int = 0        # of which accepted
    prompt_tokens: int = 0


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str              # "length" | "stop"
    stats: CompletionStats = field(default_factory=CompletionStats)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer=None):
        self.runner, self.tokenizer = runner, tokenizer
        self.config = runner.config
        ckpt = runner.checkpoint
        self.eos_token_ids = set(ckpt.eos_token_ids if ckpt else self.config.eos_token_ids)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu", dtype: str = "float32",
                        max_batch: int = 8, max_seq_len: int = 2048) -> "Engine":
        """Load a local Hugging Face checkpoint directory (see experts.checkpoint)."""
        runner = ModelRunner.from_pretrained(path, device=device, dtype=dtype, max_seqs=max_batch,
                                             max_seq_len=max_seq_len)
        tok = None
        tok_file = Path(path) / "tokenizer.json"
        if tok_file.exists():
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tok_file))
        return cls(runner, tok)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer.json in the checkpoint; pass token ids instead")
            return self.tokenizer.encode(prompt).ids
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def _decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def logits(self, token_ids) -> torch.Tensor:
        """Teacher-forced target logits (len(token_ids), V) float32 of one sequence."""
        ids = self._encode(token_ids)
        slot = self.runner.cache.allocate()
        try:
            return self.runner.run([Chunk(slot, 0, ids)], all_logits=True).logits
        finally:
            self.runner.cache.free(slot)

    def generate(self, prompts, params: SamplingParams | None = None) -> list[Completion]:
        """Greedy completions of a batch of prompts (strings or token-id lists),
        run together as one ragged batch, at most max_batch at a time."""
        params = params or SamplingParams()
        encoded = [self._encode(p) for p in prompts]
        cap = self.runner.cache.capacity
        for i, ids in enumerate(encoded):
            if len(ids) + params.max_tokens > cap:
                raise ValueError(f"prompt {i}: {len(ids)} tokens + max_tokens {params.max_tokens} exceed "
                                 f"max_seq_len {cap}")
        out: list[Completion] = []
        step = self.runner.cache.num_slots
        for i in range(0, len(encoded), step):
            out.extend(self._generate_group(encoded[i:i + step], params))
        return out

    def _generate_group(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        slots = [self.runner.cache.allocate() for _ in prompts]
        stop = set() if params.ignore_eos else set(self.eos_token_ids)
        stop |= set(params.stop_token_ids)
        done = [Completion(list(p), [], None, "length", CompletionStats(prompt_tokens=len(p))) for p in prompts]
        try:
            active = list(range(len(prompts)))
            chunks = [Chunk(slots[i], 0, prompts[i]) for i in active]
            while active:
                next_ids = greedy(self.runner.run(chunks).logits).tolist()
                still = []
                for i, tok in zip(active, next_ids):
                    c = done[i]
                    c.token_ids.append(tok)
                    c.stats.steps += 1
                    if tok in stop:
                        c.finish_reason = "stop"
                    elif len(c.token_ids) < params.max_tokens:
                        still.append(i)
                active = still
                chunks = [Chunk(slots[i], len(prompts[i]) + len(done[i].token_ids) - 1, [done[i].token_ids[-1]])
                          for i in active]
        finally:
            for s in slots:
                self.runner.cache.free(s)
        for c in done:
            c.text = self._decode(c.token_ids)
        return done
