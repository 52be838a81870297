"""The all-to-all dispatcher: routed token rows travel to the rank holding
their expert and back, over torch.distributed (gloo on CPU, NCCL on CUDA).

Legend: T tokens on this rank, K experts per token, N = T*K routed rows, W
ranks, E experts, L = max experts per rank (local slots), D hidden,
N' rows received by this rank.

dispatch (every rank, every MoE layer, even with T = 0):
    key = owner * L + local index of each (token, expert) row       (N,)
    sort rows by key  -> rows grouped by destination rank, then by its local expert
    all_to_all counts (W*L,) -> received counts (W sources, L local experts)
    split sizes to the host (the one sync per layer variable splits need)
    all_to_all rows (N, D) -> (N', D) grouped by source, then local expert
    stable sort by local expert -> the grouped-GEMM layout, counts (E_local,)
combine: the inverse permutation, all_to_all back with the splits swapped,
    then the weighted scatter-add on the token's own rank (weights never travel).

Every collective is entered by every rank in the same order, so a rank with no
tokens still takes part (with empty splits) and nothing diverges.
"""

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .dispatch import Dispatched
from .placement import Placement


@dataclass
class LayerComm:
    """What one MoE layer's dispatch + combine cost on this rank."""
    a2a_s: float = 0.0            # seconds in dispatch + combine (three all-to-alls and the permutations)
    sync_s: float = 0.0           # of which the counts all-to-all: tiny, so mostly waiting for the last rank
    bytes_out: int = 0            # row bytes sent to other ranks (dispatch + combine)
    bytes_in: int = 0             # row bytes received from other ranks
    expert_s: float = 0.0         # seconds between dispatch and combine: the grouped expert compute
    rows_in: int = 0              # routed rows this rank computed


@dataclass
class CommLog:
    layers: list[LayerComm] = field(default_factory=list)

    def reset(self) -> None:
        self.layers.clear()


class AllToAllDispatcher:
    """A `Dispatcher` over a torch.distributed group; `log` collects one
    LayerComm per MoE call (the owner resets it per step)."""

    def __init__(self, placement: Placement, rank: int, device, group=None, comm=None):
        self.W, self.rank, self.group = placement.num_ranks, rank, group
        self.comm = comm or _TorchComm(group)
        device = torch.device(device)
        L = max(placement.owner.count(r) for r in range(self.W))
        self.L, self.E_local = L, placement.owner.count(rank)
        local = placement.local_index()
        # (E,) global expert -> rank-major key owner * L + local index
        self.key = torch.tensor([r * L + i for r, i in zip(placement.owner, local)], device=device)
        self.local_of_slot = torch.arange(L, device=device).repeat(self.W)      # (W*L,) local expert of a key
        self.log = CommLog()
        # Wall time around collectives only means something once the device is done.
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._t_dispatched = 0.0

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor) -> Dispatched:
        self._sync()
        t0 = time.perf_counter()
        K, D = ids.shape[1], x.shape[1]
        key = self.key.index_select(0, ids.reshape(-1))                          # (N,)
        order = torch.argsort(key, stable=True)
        token = order // K
        send_counts = torch.bincount(key, minlength=self.W * self.L)             # (W*L,)
        recv_counts = torch.empty_like(send_counts)
        self.comm.all_to_all(recv_counts, send_counts)
        send_split, recv_split = (c.view(self.W, self.L).sum(1) for c in (send_counts, recv_counts))
        splits = torch.stack((send_split, recv_split)).tolist()                  # host sync: split sizes
        t_sync = time.perf_counter()     # after the sync: on NCCL the exchange above only queues work
        send, recv = splits
        rows = x.index_select(0, token)                                          # (N, D) by destination
        got = x.new_empty(sum(recv), D)
        self.comm.all_to_all(got, rows, recv, send)
        # received: by source rank, then local expert; regroup by local expert
        expert = self.local_of_slot.repeat_interleave(recv_counts)              # (N',)
        perm = torch.argsort(expert, stable=True)
        counts = recv_counts.view(self.W, self.L).sum(0)[:self.E_local]          # (E_local,)
        self._sync()
        t1 = time.perf_counter()
        el = x.element_size() * D
        self.log.layers.append(LayerComm(a2a_s=t1 - t0, sync_s=t_sync - t0,
                                         bytes_out=el * (sum(send) - send[self.rank]),
                                         bytes_in=el * (sum(recv) - recv[self.rank]), rows_in=sum(recv)))
        self._t_dispatched = t1
        return Dispatched(rows=got.index_select(0, perm), counts=counts, handle=(order, token, perm, send, recv))

    def combine(self, y: torch.Tensor, weights: torch.Tensor, d: Dispatched, num_tokens: int) -> torch.Tensor:
        self._sync()
        t0 = time.perf_counter()
        order, token, perm, send, recv = d.handle
        back = torch.empty_like(y)
        back.index_copy_(0, perm, y)                                             # source-major order again
        mine = y.new_empty(sum(send), y.shape[1])
        self.comm.all_to_all(mine, back, send, recv)                             # (N, D) in `order`
        w = weights.reshape(-1).index_select(0, order)
        out = torch.zeros(num_tokens, y.shape[1], device=y.device, dtype=torch.float32)
        out.index_add_(0, token, mine.float() * w[:, None])
        out = out.to(y.dtype)
        self._sync()
        t1 = time.perf_counter()
        rec = self.log.layers[-1]
        el = y.element_size() * y.shape[1]
        rec.expert_s = t0 - self._t_dispatched
        rec.a2a_s += t1 - t0
        rec.bytes_out += el * (sum(recv) - recv[self.rank])
        rec.bytes_in += el * (sum(send) - send[self.rank])
        return out


class _TorchComm:
    """Plain torch.distributed all_to_all_single."""

    def __init__(self, group):
        self.group = group

    def all_to_all(self, out, inp, out_splits=None, in_splits=None):
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)


class DeepSpeedComm:
    """deepspeed.comm's all_to_all_single (the benchmark's comparison; needs the
    optional `deepspeed` extra and deepspeed.comm initialised on this group)."""

    def __init__(self, group=None):
        import deepspeed.comm as dscomm
        self.dscomm, self.group = dscomm, group

    def all_to_all(self, out, inp, out_splits=None, in_splits=None):
        self.dscomm.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits,
                                      group=self.group)
