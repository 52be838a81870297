"""Routing statistics recorded by every MoE forward without a host sync:
tokens per expert per MoE layer accumulate in one device tensor and are read
once per step (`snapshot`)."""

from dataclasses import dataclass

import torch


@dataclass
class RoutingSnapshot:
    tokens_per_expert: torch.Tensor   # (layers, E) int64 on the host, for the last forward
    distinct_experts: list[int]       # per layer (dense layers: 0)

    @property
    def mean_distinct(self) -> float:
        moe = [n for n in self.distinct_experts if n]
        return sum(moe) / len(moe) if moe else 0.0


class RoutingStats:
    def __init__(self, num_layers: int, num_experts: int, device):
        self.counts = torch.zeros(num_layers, max(num_experts, 1), dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    def record(self, layer: int, counts: torch.Tensor) -> None:
        self.counts[layer].copy_(counts, non_blocking=True)

    def snapshot(self) -> RoutingSnapshot:
        """One host transfer for all layers."""
        host = self.counts.to("cpu", copy=True)  # a copy even on CPU: the buffer is reused next forward
        return RoutingSnapshot(tokens_per_expert=host, distinct_experts=(host > 0).sum(dim=1).tolist())
