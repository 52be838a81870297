"""The batch-1 fast paths against the general ones they shortcut: full-width
rotary tables against the half-split rotation, and the single-chunk BatchMeta
against the general builder (tensors equal, masks equal)."""

import pytest
import torch

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
def test_single_chunk_meta_matches_the_general_builder(start, n, window):
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
