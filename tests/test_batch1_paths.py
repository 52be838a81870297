"""The batch-1 fast paths against the general ones they shortcut: full-width
rotary tables against the half-split rotation, and the single-chunk BatchMeta
against the general builder (tensors equal, masks equal)."""

import pytest
import torch

from specmoe.experts import batch
from specmoe.experts.batch import BatchMeta, Chunk
from specmoe.kernels import rotary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_width_rope_equals_half_split_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    cos, sin = rotary.cos_sin_table(rotary.inv_freq_default(10000.0, 64), 128)    # (P, 32)
    cos2, sin2 = rotary.full_width_tables(cos, sin)                                # (P, 64)
    pos = torch.tensor([0, 5, 17, 127])
    x = torch.randn(4, 6, 64, generator=g).to(dtype)
    ref = rotary.apply_rope(x, cos[pos, None].to(dtype), sin[pos, None].to(dtype))
    out = rotary.apply_rope_full(x, cos2[pos, None].to(dtype), sin2[pos, None].to(dtype))
    assert torch.equal(out, ref)


def _general(chunk: Chunk, capacity: int, window: int) -> BatchMeta:
    # Two chunks force the general builder; slicing its first sequence back out
    # gives what it builds for `chunk` alone.
    other = Chunk(chunk.slot + 1, 0, [1])
    return BatchMeta.build([chunk, other], capacity, torch.device("cpu"), window)


@pytest.mark.parametrize("start,n,window", [(0, 1, 0), (7, 1, 0), (0, 6, 0), (9, 5, 0), (9, 5, 4), (3, 1, 2)])
def test_single_chunk_meta_matches_the_general_builder(start, n, window, monkeypatch):
    monkeypatch.setattr(batch, "RAGGED_ATTENTION", "pad")     # the general builder's own (padded) mask
    c = Chunk(2, start, list(range(n)))
    one = BatchMeta.build([c], 32, torch.device("cpu"), window)
    gen = _general(c, 32, window)
    assert one.pos_range == (start, start + n) and gen.pos_range is None
    assert torch.equal(one.positions, gen.positions[:n])
    assert torch.equal(one.write_index, gen.write_index[:n])
    assert torch.equal(one.last_index, gen.last_index[:1])
    assert (one.num_seqs, one.q_max, one.ctx_max, one.slot0, one.q_lens) == (1, n, start + n, 2, (n,))
    assert one.pad_index is None and one.slots is None
    if one.mask is None:          # every key visible: only a one-token chunk without a window
        assert n == 1 and not window
    else:
        L = start + n
        want = gen.mask[:1, :, :n, :L] if gen.mask.shape[-1] >= L else None
        assert want is not None and torch.equal(one.mask, want)


def test_single_chunk_meta_refuses_overflow():
    with pytest.raises(ValueError, match="exceeds the cache capacity of 8"):
        BatchMeta.build([Chunk(0, 6, [1, 2, 3])], 8, torch.device("cpu"))


def test_ragged_chunks_attend_in_parts_of_equal_length():
    """Chunks of unequal lengths: one part per length, holding its chunks'
    flat tokens in order (each part a uniform batch of its own); equal
    lengths stay one padded-free batch."""
    chunks = [Chunk(0, 5, [1, 2]), Chunk(3, 9, [1]), Chunk(1, 2, [4, 5]), Chunk(2, 7, [6, 7, 8, 9])]
    meta = BatchMeta.build(chunks, 32, torch.device("cpu"))
    assert meta.mask is None and [p.q_lens for p in meta.parts] == [(1,), (2, 2), (4,)]
    assert [p.rows.tolist() for p in meta.parts] == [[2], [0, 1, 3, 4], [5, 6, 7, 8]]
    assert meta.parts[1].ctx_max == 7 and meta.parts[1].mask.shape == (2, 1, 2, 7)
    for p in meta.parts:
        assert torch.equal(p.positions, meta.positions[p.rows]) and p.parts is None
    assert BatchMeta.build(chunks[:1] + chunks[2:3], 32, torch.device("cpu")).parts is None
