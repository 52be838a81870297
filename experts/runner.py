"""ModelRunner: a loaded model, its KV cache and one call to run a ragged batch.

This is what an engine (and later an EP worker) drives: it does not track
sequence lengths; each call says where every chunk starts.
"""

from dataclasses import dataclass, field

import torch

from ..kernels import linear as few_rows
from ..kernels.sampling import greedy, probs_from_logits
from ..kernels.verify import SampleSpec, verify_sampling_u
from .batch import BatchMeta, Chunk
from .cache import KVCache
from .checkpoint import Checkpoint, load_model
from .model import CausalLM
from .stats import RoutingSnapshot


@dataclass
class StepOutput:
    logits: torch.Tensor            # (rows, V) float32: every token's, or each chunk's last; with `full`,
                                    # only the rows of chunks marked full
    routing: RoutingSnapshot | None
    extra: dict = field(default_factory=dict)   # runner-specific measurements (EP: all-to-all time, bytes)
    argmax: torch.Tensor | None = None          # (rows,) int64, every row's argmax; only with `full` (EP: host)
    sampled: list[tuple[int, int]] | None = None  # with `sample`: (accepted, next token) per chunk with a spec


def rows_per_chunk(chunks: list[Chunk], num_logits: list[int] | None, all_logits: bool) -> list[int]:
    """How many logits rows each chunk gets (see ModelRunner.run: num_logits
    first, then all_logits, else one)."""
    if num_logits is not None:
        return list(num_logits)
    return [len(c.tokens) for c in chunks] if all_logits else [1] * len(chunks)


def check_full(full: list[bool] | None, num_chunks: int) -> None:
    if full is not None and len(full) != num_chunks:
        raise ValueError(f"full has {len(full)} entries for {num_chunks} chunks")


def check_sample(sample: list[SampleSpec | None] | None, full: list[bool] | None, rows: list[int]) -> None:
    """`sample` (one entry per chunk) asks for a verification where the rows
    are (checked before anything runs, so a bad spec fails the call, not a
    worker): such a chunk's rows are not wanted in full, its settings are valid
    and its spec carries one uniform in [0, 1) per row."""
    if sample is None:
        return
    if len(sample) != len(rows):
        raise ValueError(f"sample has {len(sample)} entries for {len(rows)} chunks")
    for i, (spec, n) in enumerate(zip(sample, rows)):
        if spec is None:
            continue
        if full is None or full[i]:
            raise ValueError(f"chunk {i} has a sample spec, so its full flag must be False")
        if len(spec.u) != n:
            raise ValueError(f"chunk {i}: {len(spec.u)} uniforms for {n} logits rows, expected one per row")
        if not (spec.temperature > 0 and spec.top_k >= 0 and 0.0 < spec.top_p <= 1.0):
            raise ValueError(f"chunk {i}: sample spec temperature {spec.temperature}, top_k {spec.top_k}, top_p "
                             f"{spec.top_p}: expected temperature > 0, top_k >= 0, top_p in (0, 1]")
        if not all(0.0 <= x < 1.0 for x in spec.u):
            raise ValueError(f"chunk {i}: sample spec uniforms {spec.u}: expected each in [0, 1)")


def verify_chunks(logits: torch.Tensor, sample: list[SampleSpec | None], chunks: list[Chunk],
                  rows: list[int]) -> list[tuple[int, int]]:
    """(accepted, next token) of every chunk with a spec, in chunk order: its
    rows (n of them, in `logits`' chunk order) verify its last n - 1 tokens as
    one-hot drafts (kernels/verify.py)."""
    out, at = [], 0
    for spec, c, n in zip(sample, chunks, rows):
        if spec is not None:
            probs = probs_from_logits(logits[at:at + n], spec.temperature, spec.top_k, spec.top_p)
            out.append(verify_sampling_u(probs, c.tokens[len(c.tokens) - n + 1:], None, spec.u))
        at += n
    return out


def full_rows(full: list[bool], rows: list[int]) -> list[int]:
    """Indices of the logits rows that belong to chunks marked full."""
    out, at = [], 0
    for f, n in zip(full, rows):
        if f:
            out.extend(range(at, at + n))
        at += n
    return out


class ModelRunner:
    def __init__(self, model: CausalLM, checkpoint: Checkpoint | None, max_seqs: int, max_seq_len: int):
        self.model, self.checkpoint = model, checkpoint
        self.config = model.config
        if max_seq_len > model.max_positions:
            raise ValueError(f"max_seq_len {max_seq_len} exceeds the rotary table of {model.max_positions}")
        self.cache = KVCache(model.config, max_seqs, max_seq_len, model.device, model.dtype)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype="float32", max_seqs: int = 8, max_seq_len: int = 2048,
                        few_row_linears: int | None = None):
        """few_row_linears: rows up to which a dense weight goes through a prepared
        copy on CPU in float32 (kernels/linear.py; 0: no copies); it is set for
        this process, so it also holds for other models loaded in it. None (a
        draft model's load) leaves the process's setting as it is."""
        if few_row_linears is not None:
            few_rows.set_small_rows(few_row_linears)
        model, ckpt = load_model(path, device=device, dtype=dtype, max_positions=max_seq_len)
        return cls(model, ckpt, max_seqs, max_seq_len)

    def new_cache(self, num_slots: int, capacity: int, num_layers: int | None = None) -> KVCache:
        """Another KV cache for this model (a self-speculative drafter's), where
        the model lives; pass it to `run(cache=...)`."""
        return KVCache(self.config, num_slots, capacity, self.model.device, self.model.dtype, num_layers=num_layers)

    def run(self, chunks: list[Chunk], all_logits: bool = False, routing: bool = False,
            num_logits: list[int] | None = None, cache: KVCache | None = None,
            layer_ids: list[int] | None = None, full: list[bool] | None = None,
            sample: list[SampleSpec | None] | None = None) -> StepOutput:
        """Append each chunk to its slot and return logits, in chunk order: for
        every new token (all_logits), for the last num_logits[i] tokens of chunk
        i, or for each chunk's last token. `cache` and `layer_ids` run a subset
        of the layers over another cache (self-speculative drafting).

        `full` (one flag per chunk) says whose rows are wanted in full (a
        sampled request); the others need only their argmax (greedy). With it,
        `argmax` holds every row's argmax and `logits` only the full chunks'
        rows, in chunk order: under expert parallelism the greedy rows then
        cross the control plane as 4 bytes instead of 4 V.

        `sample` (one entry per chunk, with `full`) verifies a sampled chunk
        of one-hot drafts here, on the uniforms its spec carries: `sampled`
        holds (accepted, next token) per chunk with a spec, and its rows stay
        here (under expert parallelism: on the worker)."""
        cache = cache or self.cache
        check_full(full, len(chunks))
        if sample is not None:
            full = full if full is not None else [False] * len(chunks)
            check_sample(sample, full, rows_per_chunk(chunks, num_logits, all_logits))
        for c in chunks:
            if not 0 <= c.slot < cache.num_slots:
                raise ValueError(f"chunk slot {c.slot} outside 0..{cache.num_slots - 1}")
            bad = [t for t in c.tokens if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} outside the vocabulary 0..{self.config.vocab_size - 1}")
        device = self.model.device
        meta = BatchMeta.build(chunks, cache.capacity, device, self.config.sliding_window)
        ids = torch.tensor([t for c in chunks for t in c.tokens], device=device)
        hidden = self.model(ids, meta, cache, layer_ids)
        if num_logits is not None:
            rows, end = [], 0
            for c, n in zip(chunks, num_logits):
                end += len(c.tokens)
                if not 1 <= n <= len(c.tokens):
                    raise ValueError(f"num_logits {n} outside 1..{len(c.tokens)} for a chunk of {len(c.tokens)}")
                rows.extend(range(end - n, end))
            hidden = hidden.index_select(0, torch.tensor(rows, device=device))
        elif not all_logits:
            hidden = hidden.index_select(0, meta.last_index)
        logits = self.model.logits(hidden)
        argmax = sampled = None
        if sample is not None and any(x is not None for x in sample):
            sampled = verify_chunks(logits, sample, chunks, rows_per_chunk(chunks, num_logits, all_logits))
        if full is not None:
            argmax = greedy(logits)
            if not any(full):
                logits = logits[:0]          # a view: the greedy batch-1 draft and decode paths pay no copy
            elif not all(full):
                keep = full_rows(full, rows_per_chunk(chunks, num_logits, all_logits))
                logits = logits.index_select(0, torch.tensor(keep, dtype=torch.long, device=device))
        return StepOutput(logits=logits, routing=self.model.routing_stats.snapshot() if routing else None,
                          argmax=argmax, sampled=sampled)
