"""Kernels against plain references and against transformers' own helpers."""

import math

import pytest
import torch

from specmoe.kernels import rotary, routing
from specmoe.kernels.attention import attend, attend_reference, mla_attend
from specmoe.kernels import linear as few_rows
from specmoe.kernels.moe import (grouped_mm_available, grouped_swiglu, grouped_swiglu_mm, moe_reference,
                                 sort_by_expert)
from specmoe.kernels.norms import rms_norm, rms_norm_reference


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rms_norm_matches_reference():
    x = torch.randn(7, 33, generator=_g())
    w = torch.randn(33, generator=_g(1))
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (5, 32, 2), (40, 16, 4), (3, 4, 4)])
def test_grouped_experts_match_token_by_token_reference(T, E, K):
    D, F = 24, 20
    x = torch.randn(T, D, generator=_g())
    wgu, wd = torch.randn(E, 2 * F, D, generator=_g(1)) * 0.2, torch.randn(E, D, F, generator=_g(2)) * 0.2
    weights, ids = routing.softmax_topk(torch.randn(T, E, generator=_g(3)), K, True)
    order, counts = sort_by_expert(ids, E)
    assert counts.sum() == T * K and torch.all(ids.reshape(-1)[order].diff() >= 0)
    rows = x.index_select(0, order // K)
    ref = moe_reference(x, ids, weights, wgu, wd)
    paths = {"loop": grouped_swiglu(rows, counts.tolist(), wgu, wd)}
    if grouped_mm_available(torch.device("cpu"), torch.float32):
        paths["grouped_mm"] = grouped_swiglu_mm(rows, counts, wgu, wd)
    for name, y in paths.items():
        out = torch.zeros(T, D).index_add_(0, order // K, y * weights.reshape(-1)[order, None])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_softmax_topk_renormalises_only_when_asked():
    logits = torch.randn(6, 8, generator=_g())
    w, ids = routing.softmax_topk(logits, 2, renormalize=False)
    p = logits.softmax(-1)
    torch.testing.assert_close(w, p.gather(1, ids))
    w2, ids2 = routing.softmax_topk(logits, 2, renormalize=True)
    assert torch.equal(ids, ids2)
    torch.testing.assert_close(w2.sum(-1), torch.ones(6))


def test_group_limited_topk_respects_groups_and_bias():
    # 8 experts in 4 groups of 2; only topk_group=1 group may be used, chosen by the
    # biased scores; weights are the unbiased sigmoid scores renormalised and scaled.
    logits = torch.tensor([[4.0, 3.0, -2.0, -2.0, 0.0, 0.0, -1.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = routing.sigmoid_grouped_topk(logits, 2, bias, n_group=4, topk_group=1, renormalize=True, scale=2.5)
    assert sorted(ids[0].tolist()) == [2, 3]          # the bias moves selection to group 1
    s = logits.sigmoid()[0, [2, 3]]
    torch.testing.assert_close(w[0].sort().values, (s / s.sum() * 2.5).sort().values)
    w, ids = routing.sigmoid_grouped_topk(logits, 2, torch.zeros(8), 4, 1, False, 1.0)
    assert sorted(ids[0].tolist()) == [0, 1]
    torch.testing.assert_close(w[0].sort().values, logits.sigmoid()[0, [0, 1]].sort().values)


def test_attend_with_gqa_and_mask_matches_reference():
    B, Q, L, H, G, d = 3, 4, 9, 8, 2, 16
    q, k, v = (torch.randn(B, Q, H, d, generator=_g()), torch.randn(B, L, G, d, generator=_g(1)),
               torch.randn(B, L, G, d, generator=_g(2)))
    mask = torch.rand(B, 1, Q, L, generator=_g(3)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(attend(q, k, v, mask, d ** -0.5), attend_reference(q, k, v, mask, d ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("mask_kind", ["per_sequence", "shared", "none"])
def test_attend_packs_grouped_heads_with_each_querys_mask_row(G, mask_kind):
    """The grouped query heads packed into their KV head's rows: every query
    row keeps its own mask row (a random mask tells rows apart), a mask of
    one sequence broadcasts, none means every key is visible; MHA (G = H) and
    one KV head (MLA's case) alike."""
    B, Q, L, H, d, dv = 3, 5, 11, 8, 16, 12
    q, k, v = (torch.randn(B, Q, H, d, generator=_g(4)), torch.randn(B, L, G, d, generator=_g(5)),
               torch.randn(B, L, G, dv, generator=_g(6)))
    mask = {"per_sequence": torch.rand(B, 1, Q, L, generator=_g(7)) > 0.5,
            "shared": torch.rand(1, 1, Q, L, generator=_g(8)) > 0.5, "none": None}[mask_kind]
    if mask is not None:
        mask[..., 0] = True
    got = attend(q, k, v, mask, d ** -0.5)
    assert got.shape == (B, Q, H, dv)
    torch.testing.assert_close(got, attend_reference(q, k, v, mask, d ** -0.5), atol=1e-5, rtol=1e-5)


def test_mla_absorbed_equals_decompressed_attention():
    """The absorbed latent form must equal attention with keys and values
    decompressed per head, which is how the DeepSeek reference computes it."""
    B, Q, L, H, n, r, C, dv = 2, 3, 7, 4, 8, 6, 10, 5
    q_nope, q_rot = torch.randn(B, Q, H, n, generator=_g()), torch.randn(B, Q, H, r, generator=_g(1))
    cache = torch.randn(B, L, C + r, generator=_g(2))
    w_uk, w_uv = torch.randn(H, n, C, generator=_g(3)), torch.randn(H, dv, C, generator=_g(4))
    mask = torch.ones(B, 1, Q, L, dtype=torch.bool).tril(L - Q)
    latent, k_rot = cache[..., :C], cache[..., C:]
    k = torch.cat((torch.einsum("blc,hnc->blhn", latent, w_uk), k_rot[:, :, None].expand(B, L, H, r)), -1)
    v = torch.einsum("blc,hvc->blhv", latent, w_uv)
    q = torch.cat((q_nope, q_rot), -1)
    scale = (n + r) ** -0.5
    torch.testing.assert_close(mla_attend(q_nope, q_rot, cache, w_uk, w_uv, mask, scale),
                               attend_reference(q, k, v, mask, scale), atol=1e-5, rtol=1e-5)


def test_interleaved_rope_preserves_dot_products_of_the_pairwise_rotation():
    T, H, R = 5, 2, 8
    x, y = torch.randn(T, H, R, generator=_g()), torch.randn(T, H, R, generator=_g(1))
    cos, sin = rotary.cos_sin_table(rotary.inv_freq_default(10000.0, R), T)
    c, s = cos[:, None], sin[:, None]
    # Reference: rotate each adjacent pair (x_2i, x_2i+1) as a complex number.
    def ref(z):
        zc = torch.view_as_complex(z.reshape(T, H, R // 2, 2).contiguous())
        return torch.view_as_real(zc * torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[:, None]).reshape(T, H, R)
    got = (rotary.apply_rope_interleaved(x, c, s) * rotary.apply_rope_interleaved(y, c, s)).sum(-1)
    torch.testing.assert_close(got, (ref(x) * ref(y)).sum(-1), atol=1e-5, rtol=1e-5)


def _hf_rope(cfg_cls, **kw):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = cfg_cls(**kw)
    return ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]](cfg, "cpu")


def test_yarn_frequencies_match_transformers():
    from transformers import DeepseekV3Config
    params = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
              "mscale_all_dim": 1.0, "rope_theta": 10000.0, "beta_fast": 32, "beta_slow": 1}
    inv_ref, att_ref = _hf_rope(DeepseekV3Config, qk_rope_head_dim=64, rope_parameters=dict(params),
                                max_position_embeddings=163840)
    inv, att = rotary.inv_freq_yarn(10000.0, 64, 40.0, 4096, 32, 1, 1.0, 1.0)
    torch.testing.assert_close(inv, inv_ref.float())
    assert math.isclose(att, att_ref)


def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    params = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    inv_ref, _ = _hf_rope(LlamaConfig, hidden_size=512, num_attention_heads=4, rope_parameters=params)
    inv = rotary.inv_freq_llama3(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(inv, inv_ref.float())


def test_few_row_linear_is_f_linear_through_a_copy_that_follows_the_weight(monkeypatch):
    """kernels/linear.py: up to SMALL_ROWS rows go through a prepared copy of w,
    one row its transposed copy and more rows its oneDNN-packed one (made once,
    remade after w changes in place, dropped with w); the result is F.linear's
    within float32 rounding, with and without a bias; more rows, a view of a
    stacked weight (a routed expert), or SMALL_ROWS = 0 take F.linear and make
    no copy."""
    monkeypatch.setattr(few_rows, "SMALL_ROWS", 8)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 64, generator=g)
    b = torch.randn(300, generator=g)
    for m in (1, 2, 3, 5, 8, 9):
        x = torch.randn(m, 64, generator=g)
        xs = torch.randn(m, 128, generator=g)[:, ::2]                     # a strided input too
        for bias in (None, b):
            for inp in (x, xs):
                torch.testing.assert_close(few_rows.linear(inp, w, bias), torch.nn.functional.linear(inp, w, bias),
                                           rtol=1e-5, atol=1e-5)
    kinds = {kind for key, kind in few_rows._copies if key == id(w)}
    assert kinds == ({"t", "packed"} if few_rows.PACKED else {"t"})
    copy = few_rows._copies[(id(w), "t")][2]
    assert copy.shape == (64, 300) and few_rows.transposed(w) is copy      # one copy, reused
    x = torch.randn(2, 64, generator=g)
    w.mul_(2.0)                                                          # an in-place change: new copies
    torch.testing.assert_close(few_rows.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(few_rows.linear(x[:1], w), x[:1] @ w.t(), rtol=1e-5, atol=1e-5)
    assert few_rows._copies[(id(w), "t")][2] is not copy
    key = id(w)
    del w, copy
    assert not {k for k, _ in few_rows._copies} & {key}                  # both dropped with the weight
    stack = torch.randn(4, 300, 64, generator=g)
    before = set(few_rows._copies)
    torch.testing.assert_close(few_rows.linear(x, stack[1]), x @ stack[1].t(), rtol=1e-5, atol=1e-5)
    assert set(few_rows._copies) <= before                               # a view: no copy
    w2 = torch.randn(300, 64, generator=g)
    few_rows.linear(torch.randn(9, 64, generator=g), w2)                 # past SMALL_ROWS: F.linear
    monkeypatch.setattr(few_rows, "SMALL_ROWS", 0)
    few_rows.linear(x, w2)
    few_rows.linear(x[:1], w2)
    assert id(w2) not in {k for k, _ in few_rows._copies}


def test_without_onednn_two_and_three_rows_take_the_transposed_copy_and_more_f_linear(monkeypatch):
    """Where torch has no oneDNN (PACKED False) the packed copy is never made:
    1-3 rows (MV_ROWS) go through the transposed copy, more rows F.linear."""
    monkeypatch.setattr(few_rows, "SMALL_ROWS", 16)
    monkeypatch.setattr(few_rows, "PACKED", False)
    g = torch.Generator().manual_seed(2)
    w, w4 = torch.randn(120, 40, generator=g), torch.randn(120, 40, generator=g)
    for m in (2, few_rows.MV_ROWS):
        x = torch.randn(m, 40, generator=g)
        torch.testing.assert_close(few_rows.linear(x, w), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    x = torch.randn(few_rows.MV_ROWS + 1, 40, generator=g)
    torch.testing.assert_close(few_rows.linear(x, w4), torch.nn.functional.linear(x, w4), rtol=1e-5, atol=1e-5)
    kinds = {(k, kind) for k, kind in few_rows._copies if k in (id(w), id(w4))}
    assert kinds == {(id(w), "t")}


def test_routed_experts_with_two_rows_or_more_go_through_a_packed_copy_of_that_expert(monkeypatch):
    """expert_linear in grouped_swiglu: an expert given 2..SMALL_ROWS rows runs on
    a oneDNN-packed copy of its own weights (made once, remade after the stack
    changes in place, dropped with it), one row or more than SMALL_ROWS on
    F.linear; the output is the per-token reference's within float32 rounding."""
    if not few_rows.PACKED:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(few_rows, "SMALL_ROWS", 4)
    g = torch.Generator().manual_seed(3)
    E, D, Fw = 5, 48, 40
    wgu, wd = torch.randn(E, 2 * Fw, D, generator=g) / 7, torch.randn(E, D, Fw, generator=g) / 7
    counts = [1, 0, 3, 6, 2]                     # expert 0 one row, 1 none, 3 past SMALL_ROWS
    x = torch.randn(sum(counts), D, generator=g)

    def reference():
        out, start = [], 0
        for e, n in enumerate(counts):
            gg, u = torch.nn.functional.linear(x[start:start + n], wgu[e]).chunk(2, dim=-1)
            out.append(torch.nn.functional.linear(torch.nn.functional.silu(gg) * u, wd[e]))
            start += n
        return torch.cat(out)
    torch.testing.assert_close(grouped_swiglu(x, counts, wgu, wd), reference(), rtol=1e-5, atol=1e-5)
    made = {(k, kind) for k, kind in few_rows._copies if k in (id(wgu), id(wd))}
    assert made == {(id(w), e) for w in (wgu, wd) for e in (2, 4)}
    copy = few_rows._copies[(id(wgu), 2)][2]
    grouped_swiglu(x, counts, wgu, wd)
    assert few_rows._copies[(id(wgu), 2)][2] is copy                      # reused
    wgu.mul_(-1.0)                                                        # an in-place change: remade
    torch.testing.assert_close(grouped_swiglu(x, counts, wgu, wd), reference(), rtol=1e-5, atol=1e-5)
    assert few_rows._copies[(id(wgu), 2)][2] is not copy
    few_rows.set_small_rows(1)                                            # only one row can take a copy
    assert not {k for k, _ in few_rows._copies} & {id(wgu), id(wd)}
    torch.testing.assert_close(grouped_swiglu(x, counts, wgu, wd), reference(), rtol=1e-5, atol=1e-5)
    assert not {k for k, _ in few_rows._copies} & {id(wgu), id(wd)}
    few_rows.set_small_rows(4)
    grouped_swiglu(x, counts, wgu, wd)
    key = id(wd)
    del wd, copy
    assert key not in {k for k, _ in few_rows._copies}                    # dropped with the stack


@pytest.mark.parametrize("bad", [-1, 2.5, "3", True, None])
def test_few_row_linears_refuses_what_is_not_a_row_count_naming_it(bad, monkeypatch):
    before = few_rows.SMALL_ROWS
    monkeypatch.setattr(few_rows, "SMALL_ROWS", before)                      # restored after the test
    with pytest.raises(ValueError, match=r"few_row_linears must be an integer >= 0 .*got"):
        few_rows.set_small_rows(bad)
    assert few_rows.SMALL_ROWS == before                                     # unchanged


def test_few_row_linears_sets_the_row_count_and_0_drops_every_copy(monkeypatch):
    """set_small_rows(n): up to n rows take a copy; 1 drops the packed copies
    (only one row can take a copy), 0 every copy made so far (their memory), and
    no new one is made."""
    monkeypatch.setattr(few_rows, "SMALL_ROWS", few_rows.SMALL_ROWS)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(200, 32, generator=g)
    few_rows.set_small_rows(5)
    few_rows.linear(torch.randn(5, 32, generator=g), w)
    few_rows.linear(torch.randn(1, 32, generator=g), w)
    assert (id(w), "t") in few_rows._copies and few_rows.copies()[1] >= w.numel() * 4
    few_rows.set_small_rows(1)
    assert {kind for k, kind in few_rows._copies if k == id(w)} == {"t"}
    few_rows.set_small_rows(0)
    assert few_rows.copies() == (0, 0)
    x = torch.randn(1, 32, generator=g)
    torch.testing.assert_close(few_rows.linear(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert few_rows.copies() == (0, 0)
