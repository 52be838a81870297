"""Routing statistics recorded by every MoE forward without a host sync:
tokens per expert per MoE layer accumulate in one device tensor and are read
once per step (`snapshot`)."""

from dataclasses import dataclass

import torch


@dataclass
class RoutingSnapshot:
    tokens_per_expert: torch.Tensor   # (layers, E) int64 on the host, for the last forward
    distinct_experts: list[int]       # per layer (dense layers: 0)
    token_experts: torch.Tensor | None = None   # (MoE layers, T, K) expert ids per token, when kept

    @property
    def mean_distinct(self) -> float:
        moe = [n for n in self.distinct_experts if n]
        return sum(moe) / len(moe) if moe else 0.0


class RoutingStats:
    def __init__(self, num_layers: int, num_experts: int, device):
        self.counts = torch.zeros(num_layers, max(num_experts, 1), dtype=torch.int64, device=device)
        self.keep_ids = False       # also keep each token's expert ids (the controller's expert-reuse plan)
        self._ids: dict[int, torch.Tensor] = {}

    def reset(self) -> None:
        self.counts.zero_()

    def record(self, layer: int, counts: torch.Tensor) -> None:
        self.counts[layer].copy_(counts, non_blocking=True)

    def record_ids(self, layer: int, ids: torch.Tensor) -> None:
        """(T, K) global expert ids of the forward's tokens at `layer` (kept only if keep_ids)."""
        if self.keep_ids:
            self._ids[layer] = ids

    def snapshot(self) -> RoutingSnapshot:
        """One host transfer for all layers."""
        host = self.counts.to("cpu", copy=True)  # a copy even on CPU: the buffer is reused next forward
        ids = None
        if self._ids:
            ids = torch.stack([self._ids[k] for k in sorted(self._ids)]).cpu()
            self._ids = {}
        return RoutingSnapshot(tokens_per_expert=host, distinct_experts=(host > 0).sum(dim=1).tolist(),
                               token_experts=ids)
