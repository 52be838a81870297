"""EPRunner: the router-side runner of an expert-parallel model on Ray.

It has the ModelRunner interface the engine drives (`config`, `checkpoint`,
`cache`, `model.device/dtype/max_positions`, `run`, `new_cache`) but holds no
weights: W `EPWorker` actors (experts/ep_worker.py) in one placement group do
the forward. Per step it encodes one `StepPlan` (msgspec), sends the same
bytes to every worker, waits for all `StepResult`s with a deadline and
reassembles the logits in chunk order. The plan and results travel over the
control plane chosen at construction: one socket connection per worker
(experts/ep_channel.py, the default: a Unix socket on the router's node, TCP
elsewhere), a plain Ray actor call per worker, or a Ray compiled graph.

Start-up: placement group (PACK or SPREAD, optional custom resources per
bundle) -> one actor per bundle -> rank 0 starts a TCPStore on port 0 of its node (the OS picks
a free port) -> every rank joins the torch.distributed group there (gloo on CPU, NCCL on
CUDA, with a collective timeout) and loads the dense weights and its experts.

Failure: a worker that dies (or a step that outlives `step_timeout_s`) is
seen at once as its control connection closing (socket control), by polling
`ray.wait` (actor calls) or by the compiled graph's monitor; the runner then
kills every worker (survivors may sit in a collective that will never
complete), removes the placement group and raises `EPWorkerError` naming the
rank; later calls raise it again.
"""

import logging
import time
from array import array
from collections.abc import Sequence

import msgspec
import torch

from ..kernels import linear as few_rows
from .batch import Chunk
from .checkpoint import DTYPES, read_checkpoint
from .ep_channel import ChannelError, RouterChannel
from .ep_worker import ChunkMsg, EPWorker, StepPlan, StepResult
from .placement import balanced, contiguous
from .runner import StepOutput, check_full, check_sample, rows_per_chunk
from .stats import RoutingSnapshot

log = logging.getLogger(__name__)

_decode_result = msgspec.msgpack.Decoder(StepResult)
_encode = msgspec.msgpack.Encoder()


def _plain(resources: dict) -> dict:
    """Resources without Ray's per-placement-group and per-node entries."""
    return {k: v for k, v in resources.items() if "_group_" not in k and not k.startswith("node:")}


class EPWorkerError(RuntimeError):
    """An expert-parallel worker died or stopped answering; the runner is unusable."""


class EPSlots:
    """Slot bookkeeping of a cache that lives on the workers: slot s is on rank
    s % W. `allocate` picks a free slot on the rank holding the fewest live
    sequences, so attention work stays spread (data-parallel attention)."""

    def __init__(self, num_slots: int, capacity: int, world: int, cache_id: int = 0, num_layers: int | None = None):
        if num_slots <= 0 or capacity <= 0:
            raise ValueError(f"KV cache needs positive slots and capacity, got {num_slots} x {capacity}")
        self.num_slots, self.capacity, self.W = num_slots, capacity, world
        self.id, self.num_layers = cache_id, num_layers
        self._free = set(range(num_slots))

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError(f"KV cache full: all {self.num_slots} slots are in use")
        used = [0] * self.W
        for s in range(self.num_slots):
            if s not in self._free:
                used[s % self.W] += 1
        slot = min(self._free, key=lambda s: (used[s % self.W], s))
        self._free.remove(slot)
        return slot

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not allocated")
        self._free.add(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def rank_of(self, slot: int) -> int:
        return slot % self.W


class _ModelInfo:
    """What the engine and drafters read from `runner.model` (no weights here)."""

    def __init__(self, config, device: torch.device, dtype: torch.dtype, max_positions: int):
        self.config, self.device, self.dtype, self.max_positions = config, device, dtype, max_positions


class EPRunner:
    def __init__(self, path, ep: int, ray_address: str | None = None, device: str = "cpu", dtype: str = "float32",
                 max_seqs: int = 8, max_seq_len: int = 2048, placement_strategy: str = "PACK",
                 num_cpus_per_worker: float | None = None, bundle_resources: dict | None = None,
                 expert_load: Sequence[float] | None = None, step_timeout_s: float = 120.0,
                 collective_timeout_s: float = 60.0, startup_timeout_s: float = 120.0, poll_s: float = 0.2,
                 control: str = "socket", comm: str = "torch", few_row_linears: int | None = None):
        """Start `ep` workers for the checkpoint at `path`. expert_load (per
        expert, e.g. tokens routed) switches placement from contiguous to
        balanced. num_cpus_per_worker defaults to 1 on CUDA (plus one GPU) and to
        an even share of the node's CPUs on CPU, capped at 1. control: "socket"
        (one socket connection per worker carrying plans and results, the least
        overhead and nothing running while idle), "actor" (one plain Ray actor
        call per worker and step) or "compiled" (a Ray compiled graph over
        shared-memory channels, whose idle readers spin); see
        docs/BENCHMARKS.md. comm: "torch" or "deepspeed" (the all-to-all
        through deepspeed.comm; optional extra, benchmark only). few_row_linears
        (kernels/linear.py; 0: no prepared copies) is set in every worker's
        process and in this one (where a draft model runs); None: this
        process's setting."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not isinstance(ep, int) or ep < 1:
            raise ValueError(f"ep must be an integer >= 1, got {ep!r}")
        if placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError(f"placement_strategy {placement_strategy!r}: expected PACK, SPREAD, STRICT_PACK or "
                             f"STRICT_SPREAD")
        if comm not in ("torch", "deepspeed"):
            raise ValueError(f"comm {comm!r}: expected 'torch' or 'deepspeed'")
        if control not in ("socket", "actor", "compiled"):
            raise ValueError(f"control {control!r}: expected 'socket', 'actor' or 'compiled'")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        if few_row_linears is not None:
            few_rows.set_small_rows(few_row_linears)
        self.checkpoint = read_checkpoint(path)
        self.config = c = self.checkpoint.config
        if c.moe is None:
            raise ValueError(f"{path}: {c.architecture} has no routed experts; expert parallelism needs an MoE model")
        E = c.moe.num_experts
        if expert_load is not None:
            if len(expert_load) != E:
                raise ValueError(f"expert_load has {len(expert_load)} entries, the model has {E} experts")
            self.placement = balanced(list(expert_load), ep)
        else:
            self.placement = contiguous(E, ep)
        print(f"specmoe EP={ep}: {self.placement.describe()}", flush=True)
        self._held = [self.placement.experts_of(r) for r in range(ep)]
        # a rank holding experts a, a+1, ..., b: its first expert (its counts go in one slice per layer)
        self._held_from = [h[0] if h == list(range(h[0], h[0] + len(h))) else None for h in self._held]
        cuda = device.startswith("cuda")
        local_device = torch.device(device) if not cuda or torch.cuda.is_available() else torch.device("cpu")
        self.model = _ModelInfo(c, local_device, DTYPES[dtype], max_seq_len)
        self._remote_device = local_device.type != "cpu"      # logits arrive on the host
        self.W, self.step_timeout_s, self.poll_s = ep, step_timeout_s, poll_s
        self.cache = EPSlots(max_seqs, max_seq_len, ep)
        self._caches = {0: self.cache}
        self._next_cache = 1
        self._step = 0
        self._error: str | None = None
        self.workers, self.pg, self._dag, self._channel, self._pings = [], None, None, None, None
        self.links: list[str] = []        # socket control per rank: "unix+shm", "unix" or "tcp"

        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=ray_address, include_dashboard=False)
        if num_cpus_per_worker is None:
            num_cpus_per_worker = 1.0 if cuda else min(1.0, max(0.01, ray.cluster_resources().get("CPU", 1) / ep))
        bundle = {"CPU": num_cpus_per_worker, **({"GPU": 1} if cuda else {}), **(bundle_resources or {})}
        self.pg = placement_group([dict(bundle) for _ in range(ep)], strategy=placement_strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=startup_timeout_s)
        if not ready:
            self.close()
            raise EPWorkerError(f"placement group of {ep} bundles {bundle} ({placement_strategy}) could not be "
                                f"placed within {startup_timeout_s:.0f} s; available now: "
                                f"{_plain(ray.available_resources())}, "
                                f"in the cluster: {_plain(ray.cluster_resources())}")
        actor = ray.remote(EPWorker)
        threads = max(1, int(num_cpus_per_worker)) if not cuda else 1
        enc = _encode.encode(self.placement)
        for r in range(ep):
            self.workers.append(actor.options(
                num_cpus=num_cpus_per_worker, num_gpus=1 if cuda else 0, resources=bundle_resources or {},
                max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(str(self.checkpoint.path), r, enc, device, dtype, max_seqs, max_seq_len, threads,
                     few_rows.SMALL_ROWS))
        try:
            self.nodes = self._gather([w.node.remote() for w in self.workers], "start-up", startup_timeout_s)
            host, port = self._gather([self.workers[0].rendezvous.remote(collective_timeout_s)], "rendezvous",
                                      startup_timeout_s)[0]
            self.worker_info = self._gather([w.init.remote(host, port, collective_timeout_s, comm)
                                             for w in self.workers],
                                            f"process group at {host}:{port}", startup_timeout_s)
            if control == "socket":
                self._channel = RouterChannel(ray.util.get_node_ip_address(), ep)
                me = ray.get_runtime_context().get_node_id()
                self.links = self._gather([w.attach.remote(self._channel.address, self._channel.token, me)
                                           for w in self.workers], "control connection", startup_timeout_s)
                self._channel.accept(startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self.rendezvous = (host, port)
        self.control = control
        if control == "compiled":
            from ray.dag import InputNode, MultiOutputNode
            with InputNode() as plan:
                self._dag = MultiOutputNode([w.step.bind(plan) for w in self.workers]).experimental_compile()

    @property
    def ep(self) -> int:
        """The expert-parallel degree (workers)."""
        return self.W

    @classmethod
    def from_pretrained(cls, path, ep: int = 2, ray_address: str | None = None, device: str = "cpu",
                        dtype: str = "float32", max_seqs: int = 8, max_seq_len: int = 2048, **kwargs) -> "EPRunner":
        return cls(path, ep, ray_address, device, dtype, max_seqs, max_seq_len, **kwargs)

    # ---- failure handling ------------------------------------------------------------------------------------

    def _gather(self, refs: list, what: str, timeout_s: float) -> list:
        """Results of one call per worker (refs in rank order), polling so a dead
        worker is seen at once; any failure stops every worker and raises."""
        import ray
        from ray.exceptions import RayActorError, RayError
        if self._error:
            raise EPWorkerError(self._error)
        index = {r: i for i, r in enumerate(refs)}
        out, pending = [None] * len(refs), list(refs)
        deadline = time.monotonic() + timeout_s
        while pending:
            # All at once (one call per step when healthy); a dead worker's call is "ready" with its error.
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=self.poll_s)
            try:
                values = ray.get(ready)
            except RayError:
                values = None             # find below which one failed
            for i, ref in enumerate(ready):
                if values is not None:
                    out[index[ref]] = values[i]
                    continue
                try:
                    out[index[ref]] = ray.get(ref)
                except RayError as e:
                    rank = index[ref] if len(refs) == self.W else 0
                    # A survivor's collective error can arrive before the dead rank's: name a dead one if any.
                    dead = self._dead_ranks(refs, index)
                    who = dead[0] if dead else rank
                    kind = "died" if dead or isinstance(e, RayActorError) else "failed"
                    self._fail(f"EP worker rank {who} of {self.W} {kind} during {what}: "
                               f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            if pending and time.monotonic() > deadline:
                late = sorted(index[r] for r in pending)
                self._fail(f"EP workers {late} of {self.W} did not answer within {timeout_s:.0f} s during {what}")
        return out

    def _gather_compiled(self, refs: list, what: str, timeout_s: float) -> list:
        """_gather for a compiled graph's outputs (one CompiledDAGRef per rank).
        A CompiledDAGRef can be read once only, so each is read with the whole
        remaining deadline: a dead actor makes the graph's monitor tear it down,
        which ends the read with an error at once."""
        from ray.exceptions import RayChannelTimeoutError
        out = []
        deadline = time.monotonic() + timeout_s
        for i, ref in enumerate(refs):
            try:
                out.append(ref.get(timeout=max(0.0, deadline - time.monotonic())))
            except RayChannelTimeoutError:
                dead = self._dead_ranks([w.node.remote() for w in self.workers], None)
                if dead:
                    self._fail(f"EP worker rank {dead[0]} of {self.W} died during {what}")
                self._fail(f"EP worker rank {i} of {self.W} did not answer within {timeout_s:.0f} s during {what}")
            except Exception as e:
                self._fail_compiled(e, what, i)
        return out

    def _submit_compiled(self, plan: bytes, what: str) -> list:
        """The compiled graph's execute: a worker that died since the last step
        can have the graph's channels closed already, so the plan's write fails
        (RayChannelError) before any result is read."""
        try:
            return self._dag.execute(plan)
        except Exception as e:
            self._fail_compiled(e, what, None)

    def _fail_compiled(self, e: Exception, what: str, rank: int | None):
        """A compiled graph's error: names the dead rank if Ray reports one (else `rank`, if known)."""
        dead = self._dead_ranks([w.node.remote() for w in self.workers], None)
        who = dead[0] if dead else rank
        self._fail(f"EP worker {'rank ' + str(who) + ' ' if who is not None else ''}of {self.W} "
                   f"{'died' if dead else 'failed'} during {what}: "
                   f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    def _gather_channel(self, logits: torch.Tensor, spans: list, what: str, timeout_s: float) -> list[bytearray]:
        """The socket control plane's results (logits rows into `logits`, see
        RouterChannel.gather); a closed connection names its rank as dead, a
        failed step names the dead rank behind it if there is one."""
        try:
            return self._channel.gather(logits, spans, timeout_s, self.poll_s, self._check_alive)
        except ChannelError as e:
            dead = [e.rank] if e.closed else self._channel.closed_ranks(wait_s=2.0)
            if not dead:
                dead = self._dead_ranks([w.ping.remote() for w in self.workers], None)
            who = dead[0] if dead else e.rank
            self._fail(f"EP worker rank {who} of {self.W} {'died' if dead else 'failed'} during {what}"
                       + (f" ({e})" if e.closed else f": {e}"))
        except TimeoutError as e:
            self._fail(f"{e} during {what}")

    def _check_alive(self) -> None:
        """During a long step (poll_s without results): ask Ray whether every
        worker is alive (a lost node does not close its connections); answered
        by the actors' own threads, which the step does not occupy."""
        import ray
        from ray.exceptions import RayActorError
        if self._pings is None:
            self._pings = [w.ping.remote() for w in self.workers]
            return
        ready, _ = ray.wait(self._pings, num_returns=len(self._pings), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError as e:
                raise ChannelError(self._pings.index(ref), True, f"{type(e).__name__}") from None
        if len(ready) == len(self._pings):
            self._pings = None

    def _dead_ranks(self, pending: list, index: dict | None) -> list[int]:
        """Ranks whose actor is dead among `pending` refs (index: ref -> rank; None: refs in rank order)."""
        import ray
        from ray.exceptions import RayActorError
        dead = []
        if not pending:
            return dead
        # Ray may report the death a little after a survivor's collective fails: wait up to 2 s for it.
        ready, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
        for ref in ready:
            try:
                ray.get(ref)
            except RayActorError:
                dead.append(index[ref] if index is not None else pending.index(ref))
            except Exception:
                pass
        return sorted(dead)

    def _fail(self, message: str):
        self._error = message
        log.error("%s; stopping all EP workers", message)
        self._stop_workers()
        raise EPWorkerError(message + "; all EP workers were stopped")

    def _stop_workers(self, failed: bool = True) -> None:
        """Kill every worker and remove the placement group. After a failure the
        workers are killed first (survivors may sit in a collective that will not
        complete); on a clean close a compiled graph is torn down first."""
        import ray
        from ray.util.placement_group import remove_placement_group
        dag, self._dag = self._dag, None
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if dag is not None and not failed:
            try:
                dag.teardown()
            except Exception:
                pass
            dag = None
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:     # already gone
                pass
        self.workers = []
        if dag is not None:
            try:
                dag.teardown()
            except Exception:
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
            self.pg = None

    def close(self) -> None:
        """Kill the workers and remove the placement group (idempotent); shuts Ray
        down too if this runner started it."""
        import ray
        if not ray.is_initialized():
            return
        self._stop_workers(failed=self._error is not None)
        if self._error is None:
            self._error = "EP runner is closed"
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    # ---- caches and the step ---------------------------------------------------------------------------------

    def new_cache(self, num_slots: int, capacity: int, num_layers: int | None = None) -> EPSlots:
        """Another KV cache on the workers (a layer-skip drafter's), slots spread like the main one."""
        cid = self._next_cache
        self._next_cache += 1
        self._gather([w.new_cache.remote(cid, num_slots, capacity, num_layers) for w in self.workers],
                     "new_cache", self.step_timeout_s)
        self._caches[cid] = slots = EPSlots(num_slots, capacity, self.W, cid, num_layers)
        return slots

    def run(self, chunks: list[Chunk], all_logits: bool = False, routing: bool = False,
            num_logits: list[int] | None = None, cache: EPSlots | None = None,
            layer_ids: list[int] | None = None, full: list[bool] | None = None,
            sample: list | None = None) -> StepOutput:
        """ModelRunner.run over the workers: same arguments, same logits rows
        (and with `full`, the same argmax; only the full chunks' rows travel;
        with `sample`, each such chunk's verification runs on its worker and
        only (accepted, next token) comes back)."""
        t0 = time.perf_counter()
        cache = cache or self.cache
        if self._caches.get(cache.id) is not cache:
            raise ValueError("cache was not made by this runner (use runner.new_cache)")
        V = self.config.vocab_size
        for c in chunks:
            if not 0 <= c.slot < cache.num_slots:
                raise ValueError(f"chunk slot {c.slot} outside 0..{cache.num_slots - 1}")
            if c.start + len(c.tokens) > cache.capacity:
                raise ValueError(f"sequence of {c.start + len(c.tokens)} tokens exceeds the cache capacity of "
                                 f"{cache.capacity} per slot")
            if c.tokens and not (0 <= min(c.tokens) and max(c.tokens) < V):
                bad = next(t for t in c.tokens if not 0 <= t < V)
                raise ValueError(f"token id {bad} outside the vocabulary 0..{V - 1}")
        if not chunks:
            raise ValueError("a forward needs at least one chunk")
        if num_logits is not None:
            for c, n in zip(chunks, num_logits):
                if not 1 <= n <= len(c.tokens):
                    raise ValueError(f"num_logits {n} outside 1..{len(c.tokens)} for a chunk of {len(c.tokens)}")
        check_full(full, len(chunks))
        rows = rows_per_chunk(chunks, num_logits, all_logits)
        if sample is not None:
            full = full if full is not None else [False] * len(chunks)
            check_sample(sample, full, rows)
            if not any(x is not None for x in sample):
                sample = None
        spans, num_rows, every, num_all = self._layout(chunks, rows, full)
        self._step += 1
        plan = _encode.encode(StepPlan(self._step, [ChunkMsg(c.slot, c.start, c.tokens) for c in chunks],
                                       num_logits, all_logits, cache.id, layer_ids, routing, full, sample))
        t1 = time.perf_counter()
        if self._error:
            raise EPWorkerError(self._error)
        what = f"step {self._step}"
        if self._channel is not None:
            try:
                self._channel.broadcast(plan)
            except ChannelError as e:
                self._fail(f"EP worker rank {e.rank} of {self.W} died before {what}: {e}")
            logits = torch.empty(num_rows, V)
            raw = self._gather_channel(logits, spans, what, self.step_timeout_s)
        elif self._dag is not None:
            raw = self._gather_compiled(self._submit_compiled(plan, what), what, self.step_timeout_s)
        else:
            raw = self._gather([w.step.remote(plan) for w in self.workers], what, self.step_timeout_s)
        t2 = time.perf_counter()
        res = [_decode_result.decode(b) for b in raw]
        if self._channel is None:
            logits = self._place([torch.frombuffer(r.logits, dtype=torch.float32).view(-1, V) if r.rows else None
                                  for r in res], spans, num_rows, V)
        argmax = None
        if full is not None:
            argmax = self._argmax(res, every, num_all)
        if self._remote_device:
            logits = logits.to(self.model.device)      # the argmax stays on the host: it is read there
        out = StepOutput(logits=logits, routing=self._routing(res) if routing else None, argmax=argmax,
                         sampled=None if sample is None else self._sampled(res, chunks, sample))
        t4 = time.perf_counter()
        out.extra.update(self._measurements(res, t4 - t0, (t1 - t0) + (t4 - t2), t2 - t1))
        return out

    def _layout(self, chunks, rows: list[int], full: list[bool] | None) -> tuple[list, int, list | None, int]:
        """Where each rank's rows go: per rank, (first output row, rows) spans
        in the order the rank sends them (its chunks in plan order), adjacent
        spans merged, and the number of output rows: for the logits (with
        `full`, its full chunks only) and, with `full`, for every row's argmax
        (else None, 0). One pass over the chunks for both."""
        W = self.W
        spans: list[list[tuple[int, int]]] = [[] for _ in range(W)]
        every: list[list[tuple[int, int]]] | None = None if full is None else [[] for _ in range(W)]
        row = at = 0
        def add(mine: list[tuple[int, int]], first: int, n: int) -> None:     # merged with an adjacent span
            if mine and mine[-1][0] + mine[-1][1] == first:
                mine[-1] = (mine[-1][0], mine[-1][1] + n)
            else:
                mine.append((first, n))

        for i, (c, n) in enumerate(zip(chunks, rows)):
            r = c.slot % W
            if every is not None:
                add(every[r], at, n)
                at += n
                if not full[i]:
                    continue
            add(spans[r], row, n)
            row += n
        return spans, row, every, at

    @staticmethod
    def _place(blocks: list[torch.Tensor | None], spans, num_rows: int, V: int) -> torch.Tensor:
        """The output rows (num_rows, V) from each rank's block (its rows, in
        its spans' order; None for a rank without rows)."""
        if len(blocks) == 1 and blocks[0] is not None:
            return blocks[0]
        out = torch.empty(num_rows, V)
        for block, mine in zip(blocks, spans):
            at = 0
            for row, n in mine:
                out[row:row + n] = block[at:at + n]
                at += n
        return out

    @staticmethod
    def _argmax(res: list[StepResult], spans, num_rows: int) -> torch.Tensor:
        """Every row's argmax (num_rows,) int64 from each rank's int32 bytes, placed
        by spans as a list: a few ints per rank, where a tensor op per span
        would cost ~2 us each (0.15 ms at batch 64 over 4 ranks)."""
        out = [0] * num_rows
        for r, mine in zip(res, spans):
            vals, at = array("i", r.argmax).tolist(), 0
            for row, n in mine:
                out[row:row + n] = vals[at:at + n]
                at += n
        return torch.frombuffer(array("q", out), dtype=torch.long)     # ~2 us, torch.tensor(list) ~7 us

    def _sampled(self, res: list[StepResult], chunks, sample) -> list[tuple[int, int]]:
        """(accepted, next token) of every chunk with a sample spec, in chunk
        order, from each rank's flat pairs (its such chunks in plan order)."""
        W, at = self.W, [0] * self.W
        vals = [r.sampled for r in res]             # rank order
        out = []
        for c, spec in zip(chunks, sample):
            if spec is not None:
                r = c.slot % W
                out.append((vals[r][at[r]], vals[r][at[r] + 1]))
                at[r] += 2
        return out

    def _routing(self, res: list[StepResult]) -> RoutingSnapshot:
        """Global tokens per expert: each expert's rows were counted by its owner."""
        E = self.placement.num_experts
        flat = [0] * (self.config.num_layers * E)
        for r in res:
            held, first = self._held[r.rank], self._held_from[r.rank]
            for base, counts in zip(range(0, len(flat), E), r.tokens_per_expert):
                if first is not None:            # contiguous placement: one slice per layer
                    flat[base + first:base + first + len(counts)] = counts
                else:
                    for e, n in zip(held, counts):
                        flat[base + e] = n
        return RoutingSnapshot(tokens_per_expert=torch.frombuffer(array("q", flat), dtype=torch.int64).view(-1, E),
                               distinct_experts=[E - flat[b:b + E].count(0) for b in range(0, len(flat), E)])

    def _measurements(self, res: list[StepResult], total_s: float, router_s: float, wait_s: float) -> dict:
        """Per rank (lists in rank order) and per MoE layer ([rank][layer])."""
        t = time.perf_counter()
        distinct = [[len(layer) - layer.count(0) for layer in r.tokens_per_expert] for r in res]
        slowest = max(r.forward_s for r in res)
        out = {
            "ep": self.W,
            "step_s": total_s,
            "worker_s": [r.forward_s for r in res],
            "attn_tokens_per_rank": [r.tokens for r in res],   # tokens each rank ran attention for
            "a2a_s": [sum(r.a2a_s) for r in res],
            "a2a_sync_s": [sum(r.a2a_sync_s) for r in res],     # of a2a_s: the counts exchange, ~ waiting
            "a2a_bytes": [sum(r.a2a_bytes_out) for r in res],
            "a2a_layer_s": [r.a2a_s for r in res],
            "a2a_layer_bytes_out": [r.a2a_bytes_out for r in res],
            "a2a_layer_bytes_in": [r.a2a_bytes_in for r in res],
            "expert_s": [sum(r.expert_s) for r in res],
            "distinct_experts_per_rank": distinct,          # [rank][layer]; needs routing=True
            "tokens_per_local_expert": [r.tokens_per_expert for r in res],
            # Plan out + results back: the router's wall time not spent waiting for the slowest worker,
            # of which control_router_s is the router's own work (encode, decode, logits, these figures).
            "control_plane_s": router_s + max(0.0, wait_s - slowest),
            "control_router_s": router_s,
        }
        own = time.perf_counter() - t                 # building these figures is router work too
        out["control_router_s"] += own
        out["control_plane_s"] += own
        return out
