"""The expert-parallel worker: one Ray actor per rank (per GPU; on CPU a
process with a share of the cores), holding the dense weights, its shard of
the routed experts (experts/placement.py) and the KV cache of the sequences
whose slots map to it (data-parallel attention).

Ownership at each stage of a step: the router (experts/ep_runner.py) owns
sequences and slots and sends every worker the same `StepPlan`; each worker
picks the chunks of its own slots, runs attention for them, and joins every
MoE layer's all-to-all (with zero tokens if it has none); it answers with a
`StepResult` holding the logits of its rows (or, for sampled requests with
one-hot drafts, the verification's outcome: the plan carries their uniforms)
and what it measured.

Messages are msgspec structs (plan in, result out); tensors travel only over
torch.distributed inside the MoE layers, and, with the socket control plane
(experts/ep_channel.py, the default), the logits rows as raw float32 bytes
after the result struct.

Slots: global slot s lives on rank s % W, at local slot s // W.
"""

import os
import socket
import time
from datetime import timedelta

import msgspec
import torch

from ..kernels import linear as few_rows
from ..kernels.verify import SampleSpec
from .batch import Chunk
from .placement import Placement


class ChunkMsg(msgspec.Struct, array_like=True, frozen=True):
    slot: int                       # global slot
    start: int
    tokens: list[int]


class StepPlan(msgspec.Struct, frozen=True):
    """One step, identical for every worker."""
    step: int
    chunks: list[ChunkMsg]
    num_logits: list[int] | None = None     # rows per chunk (last n), or
    all_logits: bool = False                # every token's row, or each chunk's last
    cache: int = 0                          # 0 = the main KV cache, else a cache from new_cache
    layer_ids: list[int] | None = None      # a subset of layers (self-speculative drafting)
    routing: bool = False                   # send tokens-per-expert back
    full: list[bool] | None = None          # per chunk: logits rows in full, or only their argmax
    sample: list[SampleSpec | None] | None = None   # per chunk: verify its one-hot drafts here (sampling)


class StepResult(msgspec.Struct, frozen=True):
    rank: int
    logits: bytearray                       # (rows, V) float32, this rank's chunks in plan order (socket
                                            # control: empty here, the rows follow the struct raw)
    rows: int
    tokens: int                             # attention tokens this rank ran
    forward_s: float                        # the whole step on this rank, from plan decoded to logits ready
    a2a_s: list[float]                      # per MoE layer: dispatch + combine seconds
    a2a_sync_s: list[float]                 # per MoE layer: of which the counts exchange (waiting for peers)
    a2a_bytes_out: list[int]                # per MoE layer: row bytes sent to other ranks
    a2a_bytes_in: list[int]
    expert_s: list[float]                   # per MoE layer: grouped expert compute seconds
    tokens_per_expert: list[list[int]] = []   # (layers, E_local) rows each local expert computed
    argmax: bytearray = bytearray()         # with plan.full: every row's argmax, int32, chunks in plan order
    sampled: list[int] = []                 # with plan.sample: accepted, next token of each such chunk of
                                            # this rank, flat, in plan order


_decode_plan = msgspec.msgpack.Decoder(StepPlan)
_encode = msgspec.msgpack.Encoder()


class EPWorker:
    """The actor body (ep_runner wraps it with ray.remote and its resources)."""

    def __init__(self, path: str, rank: int, placement: bytes, device: str, dtype: str, max_seqs: int,
                 max_seq_len: int, num_threads: int = 1, few_row_linears: int = few_rows.DEFAULT_ROWS):
        torch.set_num_threads(num_threads)
        few_rows.set_small_rows(few_row_linears)      # this worker's process (kernels/linear.py)
        self.path, self.rank = path, rank
        self.placement = msgspec.msgpack.decode(placement, type=Placement)
        self.W = self.placement.num_ranks
        self.device = torch.device("cuda" if device.startswith("cuda") else device)
        self.dtype, self.max_seq_len = dtype, max_seq_len
        self.local_slots = -(-max_seqs // self.W)         # ceil: slots s with s % W == rank, at most
        self.runner = None
        self.caches = {}
        self._store = None

    def node(self) -> tuple[str, str, int]:
        """(Ray node id, the node's address as Ray knows it, pid)."""
        import ray
        node_id = ray.get_runtime_context().get_node_id()
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id),
                  ray.util.get_node_ip_address())
        return node_id, ip, os.getpid()

    def rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """Rank 0 only: start the process group's TCPStore on this node's Ray
        address (127.0.0.1 when Ray runs there) with port 0, so the OS picks a
        free port atomically (no pick-then-bind race), and return the address."""
        from torch.distributed import TCPStore
        host = self.node()[1]
        self._store = TCPStore(host, 0, self.W, is_master=True, timeout=timedelta(seconds=timeout_s),
                               wait_for_workers=False)
        return host, self._store.port

    def init(self, host: str, port: int, timeout_s: float, comm: str = "torch") -> dict:
        """Join the process group, then load the dense weights and this rank's
        experts. comm: "torch" (torch.distributed) or "deepspeed" (deepspeed.comm
        over the same group; the optional extra, for the benchmark's comparison)."""
        import torch.distributed as dist

        from .alltoall import AllToAllDispatcher
        from .checkpoint import load_model
        from .runner import ModelRunner
        t0 = time.perf_counter()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(0)     # Ray leaves one visible GPU per worker
        store = self._store if self.rank == 0 else dist.TCPStore(host, port, self.W, is_master=False,
                                                                 timeout=timedelta(seconds=timeout_s))
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.W,
                                timeout=timedelta(seconds=timeout_s))
        experts = self.placement.experts_of(self.rank)
        wrapper = None
        if comm == "deepspeed":
            import deepspeed.comm as dscomm

            from .alltoall import DeepSpeedComm
            dscomm.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                    dist_init_required=False)
            wrapper = DeepSpeedComm()
        elif comm != "torch":
            raise ValueError(f"comm {comm!r}: expected 'torch' or 'deepspeed'")
        self.dispatcher = AllToAllDispatcher(self.placement, self.rank, self.device, comm=wrapper)
        model, ckpt = load_model(self.path, device=str(self.device), dtype=self.dtype,
                                 max_positions=self.max_seq_len, dispatcher=self.dispatcher, experts=experts)
        self.model = model
        self.runner = ModelRunner(model, ckpt, self.local_slots, self.max_seq_len)
        self.caches = {0: self.runner.cache}
        return {"rank": self.rank, "backend": backend, "comm": comm, "experts": experts,
                "load_s": time.perf_counter() - t0}

    def new_cache(self, cache_id: int, num_slots: int, capacity: int, num_layers: int | None) -> int:
        self.caches[cache_id] = self.runner.new_cache(-(-num_slots // self.W), capacity, num_layers)
        return cache_id

    def attach(self, address: tuple, token: bytes, router_node: str) -> str:
        """Open the socket control connection to the router (Unix socket on the
        router's node, else TCP) and serve steps on it from a thread of this
        process (experts/ep_channel.py); the actor's own thread stays free for
        Ray calls (new_cache, liveness pings). Returns the link: "unix+shm"
        (rows through shared memory), "unix" or "tcp"."""
        import ray

        from .ep_channel import connect, start_thread
        same = ray.get_runtime_context().get_node_id() == router_node
        sock, region = connect(address, token, self.rank, 30.0, same)
        start_thread(sock, self._step_parts, self.rank, region)
        return "tcp" if sock.family != socket.AF_UNIX else "unix+shm" if region is not None else "unix"

    def ping(self) -> int:
        return self.rank

    def linear_copies(self) -> dict:
        """This process's few-row linear setting and the prepared copies it holds (kernels/linear.py)."""
        n, nbytes = few_rows.copies()
        return {"few_row_linears": few_rows.SMALL_ROWS, "copies": n, "bytes": nbytes}

    def step(self, plan_bytes: bytes) -> bytes:
        """One step through Ray (actor call or compiled graph): the result with its logits inline."""
        res, logits = self._run(plan_bytes)
        return _encode.encode(msgspec.structs.replace(res, logits=logits.numpy().tobytes()))

    def _step_parts(self, plan_bytes) -> tuple[bytes, object]:
        """One step through the control socket: the result without logits, and the logits rows (numpy)."""
        res, logits = self._run(plan_bytes)
        return _encode.encode(res), logits.numpy()

    def _run(self, plan_bytes) -> tuple[StepResult, torch.Tensor]:
        plan = _decode_plan.decode(plan_bytes)
        t0 = time.perf_counter()
        self.dispatcher.log.reset()
        mine = [i for i, c in enumerate(plan.chunks) if c.slot % self.W == self.rank]
        chunks = [Chunk(plan.chunks[i].slot // self.W, plan.chunks[i].start, plan.chunks[i].tokens) for i in mine]
        cache = self.caches[plan.cache]
        self.model.routing_stats.reset()
        argmax = bytearray()
        sampled = []
        if chunks:
            sample = None if plan.sample is None else [plan.sample[i] for i in mine]
            out = self.runner.run(chunks, all_logits=plan.all_logits, cache=cache, layer_ids=plan.layer_ids,
                                  num_logits=None if plan.num_logits is None else [plan.num_logits[i] for i in mine],
                                  full=None if plan.full is None else [plan.full[i] for i in mine], sample=sample)
            logits = out.logits.float().cpu().contiguous()
            if out.argmax is not None:
                argmax = bytearray(out.argmax.to(torch.int32).cpu().numpy())
            if out.sampled:
                sampled = [v for pair in out.sampled for v in pair]
        else:
            self._idle(plan.layer_ids)
            logits = torch.empty(0, self.model.config.vocab_size)
        tpe = []
        if plan.routing:
            tpe = self.model.routing_stats.counts.cpu().tolist()
        forward_s = time.perf_counter() - t0
        log = self.dispatcher.log.layers
        res = StepResult(rank=self.rank, logits=bytearray(), rows=logits.shape[0],
                         tokens=sum(len(c.tokens) for c in chunks), forward_s=forward_s,
                         a2a_s=[x.a2a_s for x in log], a2a_sync_s=[x.sync_s for x in log],
                         a2a_bytes_out=[x.bytes_out for x in log],
                         a2a_bytes_in=[x.bytes_in for x in log], expert_s=[x.expert_s for x in log],
                         tokens_per_expert=tpe, argmax=argmax, sampled=sampled)
        return res, logits

    @torch.inference_mode()
    def _idle(self, layer_ids: list[int] | None) -> None:
        """No sequence of this rank runs this step: still join every MoE layer
        (routing zero tokens), so the other ranks' collectives complete and this
        rank computes its experts on the rows they send."""
        ids = range(self.model.config.num_layers) if layer_ids is None else layer_ids
        x = torch.empty(0, self.model.config.hidden_size, device=self.device, dtype=self.model.dtype)
        for i in ids:
            layer = self.model.layers[i]
            if hasattr(layer, "moe"):
                layer.moe(x)

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
