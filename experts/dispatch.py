"""Dispatchers move routed token rows to the experts that compute them and
back. The MoE layer calls `dispatch` then its grouped expert compute then
`combine`; which dispatcher it has is chosen once at construction.

Legend: T tokens, K experts per token, N = T*K routed rows, E experts, D hidden.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from ..kernels.moe import sort_by_expert


@dataclass
class Dispatched:
    rows: torch.Tensor        # (N', D) token rows grouped by local expert
    counts: torch.Tensor      # (E_local,) rows per local expert, on device
    handle: object            # what combine needs to send results back


class Dispatcher(Protocol):
    def dispatch(self, x: torch.Tensor, ids: torch.Tensor) -> Dispatched: ...
    def combine(self, y: torch.Tensor, weights: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor: ...


class LocalDispatcher:
    """All experts in this process: a sort by expert and a weighted scatter-add back."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        order, counts = sort_by_expert(ids, self.num_experts)
        token = order // ids.shape[1]
        return Dispatched(rows=x.index_select(0, token), counts=counts, handle=(order, token))

    def combine(self, y: torch.Tensor, weights: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor:
        order, token = d.handle
        w = weights.reshape(-1).index_select(0, order)
        out = torch.zeros(num_tokens, y.shape[1], device=y.device, dtype=torch.float32)
        out.index_add_(0, token, y.float() * w[:, None])
        return out.to(y.dtype)
