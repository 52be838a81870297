"""What one forward computes: a ragged batch of sequence chunks.

Legend: B sequences, T = sum of chunk lengths (flat tokens), Q the longest
chunk, L the longest context after the chunk (start + chunk length).

A chunk appends q_len tokens to a sequence whose first `start` tokens are
already in its cache slot: q_len = prompt length for a prefill, 1 for a
decode, k+1 for a verification. The caller owns sequence lengths; rolling
back rejected tokens is just passing a smaller `start` next time, because the
mask only lets a query see positions < start + q_len of its own slot.
"""

from dataclasses import dataclass

import torch


# "split": a batch of chunks of unequal lengths attends one part per length (BatchMeta.parts);
# "pad": every chunk padded to the longest (scripts/bench_ragged.py --ragged measures both).
RAGGED_ATTENTION = "split"


@dataclass(frozen=True)
class Chunk:
    slot: int            # cache slot of the sequence
    start: int           # tokens of the sequence already cached (position of the first new token)
    tokens: list[int]    # the new tokens


@dataclass
class BatchMeta:
    """Index tensors for one forward, built once and shared by all layers."""
    num_seqs: int
    q_max: int
    ctx_max: int
    positions: torch.Tensor          # (T,) absolute position of every flat token
    write_index: torch.Tensor        # (T,) slot * capacity + position, into a flattened cache layer
    pad_index: torch.Tensor | None   # (T,) row of each flat token in the padded (B*Q) layout; None if uniform
    slots: torch.Tensor | None       # (B,) cache slots; None if they are the contiguous range slot0..slot0+B
    slot0: int
    mask: torch.Tensor | None        # (B, 1, Q, L) bool, True = may attend; None when every key is visible
                                     # or the batch attends in parts (each part has its own)
    last_index: torch.Tensor         # (B,) flat index of each chunk's last token
    q_lens: tuple[int, ...]
    pos_range: tuple[int, int] | None = None   # (first, end) when positions are one contiguous run
                                               # (a single chunk): rotary tables are sliced, not gathered
    parts: tuple["BatchMeta", ...] | None = None   # chunks of unequal lengths: one uniform part per length
    rows: torch.Tensor | None = None           # (T_part,) a part's flat tokens among its parent's

    @staticmethod
    def build(chunks: list[Chunk], capacity: int, device: torch.device, sliding_window: int = 0) -> "BatchMeta":
        if not chunks:
            raise ValueError("a forward needs at least one chunk")
        q_lens = [len(c.tokens) for c in chunks]
        if min(q_lens) == 0:
            raise ValueError("every chunk needs at least one token")
        if len(chunks) == 1:
            return BatchMeta._build_one(chunks[0], q_lens[0], capacity, device, sliding_window)
        B, Q = len(chunks), max(q_lens)
        ends = [c.start + n for c, n in zip(chunks, q_lens)]
        L = max(ends)
        if L > capacity:
            raise ValueError(f"sequence of {L} tokens exceeds the cache capacity of {capacity} per slot")
        positions, write, pad = [], [], []
        for b, (c, n) in enumerate(zip(chunks, q_lens)):
            positions.extend(range(c.start, c.start + n))
            write.extend(range(c.slot * capacity + c.start, c.slot * capacity + c.start + n))
            pad.extend(range(b * Q, b * Q + n))
        uniform = all(n == Q for n in q_lens)
        slot_list = [c.slot for c in chunks]
        contiguous = slot_list == list(range(slot_list[0], slot_list[0] + B))
        split = not uniform and RAGGED_ATTENTION == "split"         # attention in parts, each with its mask
        # Query i of chunk b sits at position start_b + i and may see keys j <= start_b + i
        # (and j > start_b + i - window with a sliding window).
        needs_mask = not split and (not (all(e == L for e in ends) and Q == 1) or sliding_window)
        mask = None
        if needs_mask:
            starts = torch.tensor([c.start for c in chunks], device=device)
            qpos = starts[:, None] + torch.arange(Q, device=device)[None, :]          # (B, Q)
            kpos = torch.arange(L, device=device)
            mask = kpos[None, None, :] <= qpos[:, :, None]                            # (B, Q, L)
            if sliding_window:
                mask &= kpos[None, None, :] > qpos[:, :, None] - sliding_window
            mask = mask[:, None]
        last = torch.tensor(q_lens, device=device).cumsum(0) - 1
        parts = None
        if split:
            # Attention per chunk length: padding every chunk to the longest would make one sequence's
            # deep draft lengthen every sequence's queries (B x Q_max x L work, priced nowhere).
            first = [0]
            for n in q_lens[:-1]:
                first.append(first[-1] + n)
            by_len: dict[int, list[int]] = {}
            for b, n in enumerate(q_lens):
                by_len.setdefault(n, []).append(b)
            parts = []
            for n, idx in sorted(by_len.items()):
                part = BatchMeta.build([chunks[b] for b in idx], capacity, device, sliding_window)
                part.rows = torch.tensor([first[b] + i for b in idx for i in range(n)], device=device)
                parts.append(part)
            parts = tuple(parts)
        return BatchMeta(
            num_seqs=B, q_max=Q, ctx_max=L,
            positions=torch.tensor(positions, device=device),
            write_index=torch.tensor(write, device=device),
            pad_index=None if uniform else torch.tensor(pad, device=device),
            slots=None if contiguous else torch.tensor(slot_list, device=device),
            slot0=slot_list[0], mask=mask, last_index=last, q_lens=tuple(q_lens),
            parts=parts)

    @staticmethod
    def _build_one(c: Chunk, n: int, capacity: int, device: torch.device, sliding_window: int) -> "BatchMeta":
        """`build` for one chunk (batch-1 decode, verification, drafting): the
        same tensors from a few range ops instead of Python lists."""
        L = c.start + n
        if L > capacity:
            raise ValueError(f"sequence of {L} tokens exceeds the cache capacity of {capacity} per slot")
        positions = torch.arange(c.start, L, device=device)                           # (T,)
        mask = None
        if n > 1 or sliding_window:
            kpos = torch.arange(L, device=device)
            mask = kpos[None, :] <= positions[:, None]                                 # (Q, L)
            if sliding_window:
                mask &= kpos[None, :] > positions[:, None] - sliding_window
            mask = mask[None, None]                                                    # (1, 1, Q, L)
        return BatchMeta(
            num_seqs=1, q_max=n, ctx_max=L, positions=positions,
            write_index=positions + c.slot * capacity, pad_index=None, slots=None, slot0=c.slot, mask=mask,
            last_index=torch.tensor([n - 1], device=device), q_lens=(n,), pos_range=(c.start, L))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, Q, ...), zeros in the padding."""
        if self.pad_index is None:
            return x.view(self.num_seqs, self.q_max, *x.shape[1:])
        out = x.new_zeros(self.num_seqs * self.q_max, *x.shape[1:])
        out.index_copy_(0, self.pad_index, x)
        return out.view(self.num_seqs, self.q_max, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, ...) -> (T, ...)."""
        flat = x.reshape(self.num_seqs * self.q_max, *x.shape[2:])
        return flat if self.pad_index is None else flat.index_select(0, self.pad_index)

    def attention(self, fn, queries: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """fn(*padded queries (B, Q, ...), *contexts (B, L, ...), mask) -> (B, Q, ...) attention output,
        run on the whole batch padded, or, for chunks of unequal lengths, on each part of equal ones
        (no padded queries); queries (T, ...) -> (T, ...)."""
        if self.parts is None:
            return self.unpad(fn(*(self.pad(x) for x in queries), *(self.gather_context(c) for c in caches),
                                 self.mask))
        out = None
        for p in self.parts:
            o = p.unpad(fn(*(p.pad(x.index_select(0, p.rows)) for x in queries),
                           *(p.gather_context(c) for c in caches), p.mask))
            if out is None:
                out = o.new_empty(queries[0].shape[0], *o.shape[1:])
            out.index_copy_(0, p.rows, o)
        return out

    def gather_context(self, layer_cache: torch.Tensor) -> torch.Tensor:
        """(S, capacity, ...) cache of one layer -> (B, L, ...) rows of this batch's slots."""
        if self.slots is None:
            return layer_cache[self.slot0:self.slot0 + self.num_seqs, :self.ctx_max]
        return layer_cache[:, :self.ctx_max].index_select(0, self.slots)
