"""The KV cache: a fixed number of slots, each holding up to `capacity`
positions of one sequence, one tensor (or two) per layer.

Standard attention caches keys and values (S, capacity, G, d) each; MLA caches
one compressed row per position (S, capacity, C + r): the normed latent and
the rotated shared key side by side.
"""

import torch

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, num_slots: int, capacity: int, device, dtype, num_layers: int | None = None):
        if num_slots <= 0 or capacity <= 0:
            raise ValueError(f"KV cache needs positive slots and capacity, got {num_slots} x {capacity}")
        self.num_slots, self.capacity = num_slots, capacity
        if cfg.mla is not None:
            width = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
            self.layers = [(torch.zeros(num_slots, capacity, width, device=device, dtype=dtype),)
                           for _ in range(cfg.num_layers if num_layers is None else num_layers)]
        else:
            shape = (num_slots, capacity, cfg.num_kv_heads, cfg.head_dim)
            self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                           for _ in range(cfg.num_layers if num_layers is None else num_layers)]
        self._free = list(range(num_slots - 1, -1, -1))

    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for layer in self.layers for t in layer)

    def allocate(self) -> int:
        """A free slot; RuntimeError when all are taken (the scheduler keeps within budget)."""
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.num_slots} slots are in use")
        return self._free.pop()

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)
