"""ModelRunner: a loaded model, its KV cache and one call to run a ragged batch.

This is what an engine (and later an EP worker) drives: it does not track
sequence lengths; each call says where every chunk starts.
"""

from dataclasses import dataclass

import torch

from .batch import BatchMeta, Chunk
from .cache import KVCache
from .checkpoint import Checkpoint, load_model
from .model import CausalLM
from .stats import RoutingSnapshot


@dataclass
class StepOutput:
    logits: torch.Tensor            # (rows, V) float32: every token's, or each chunk's last
    routing: RoutingSnapshot | None


class ModelRunner:
    def __init__(self, model: CausalLM, checkpoint: Checkpoint | None, max_seqs: int, max_seq_len: int):
        self.model, self.checkpoint = model, checkpoint
        self.config = model.config
        if max_seq_len > model.max_positions:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the rotary table of {model.max_positions}")
        self.cache = KVCache(model.config, max_seqs, max_seq_len, model.device, model.dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="float32", max_seqs: int = 8, max_seq_len: int = 2048):
        model, ckpt = load_model(path, device=device, dtype=dtype, max_positions=max_seq_len)
        return cls(model, ckpt, max_seqs, max_seq_len)

    def run(self, chunks: list[Chunk], all_logits: bool = False, routing: bool = False) -> StepOutput:
        """Append each chunk to its slot and return logits for every new token
        (all_logits) or for each chunk's last token, in chunk order."""
        for c in chunks:
            if not 0 <= c.slot < self.cache.num_slots:
                raise ValueError(f"chunk slot {c.slot} outside 0..{self.cache.num_slots - 1}")
            bad = [t for t in c.tokens if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} outside the vocabulary 0..{self.config.vocab_size - 1}")
        device = self.model.device
        meta = BatchMeta.build(chunks, self.cache.capacity, device, self.config.sliding_window)
        ids = torch.tensor([t for c in chunks for t in c.tokens], device=device)
        hidden = self.model(ids, meta, self.cache)
        if not all_logits:
            hidden = hidden.index_select(0, meta.last_index)
        logits = self.model.logits(hidden)
        return StepOutput(logits=logits, routing=self.model.routing_stats.snapshot() if routing else None)
