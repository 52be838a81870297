"""Attention of padded query blocks over a KV cache.

Legend: B sequences, Q padded query length, L key length (the longest
context in the batch), H query heads, G KV heads, d head dim, C MLA latent
dim, r MLA rotary dim.

Masks are boolean, True where a query may attend; they are built once per
forward by the caller (experts.batch) and shared by all layers.
"""

import torch
import torch.nn.functional as F


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """q (B, Q, H, d), k (B, L, G, d), v (B, L, G, dv), mask (B or 1, 1, Q, L) -> (B, Q, H, dv).

    With grouped KV heads (G < H) the r = H / G query heads that share a KV
    head are packed into its query rows: one attention of Q * r queries per
    (sequence, KV head) instead of r attentions of Q queries each, the same
    keys read once (query head h uses KV head h // r, as repeat_interleave of
    the KV heads has it; each packed row keeps its query's mask row). On one
    CPU core at B = 64, H = 8, G = 2, d = 64, L = 49 this takes a layer's
    attention from 0.63 / 1.17 / 1.98 ms to 0.40 / 0.58 / 1.71 ms at Q = 1 / 2
    / 8 (scripts/bench_ragged.py measures the steps it changes)."""
    B, Q, H, d = q.shape
    G = k.shape[2]
    if G == H:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=scale)
        return out.transpose(1, 2)
    r = H // G
    qp = q.reshape(B, Q, G, r, d).permute(0, 2, 1, 3, 4).reshape(B, G, Q * r, d)     # row = query * r + head
    m = None if mask is None else mask.repeat_interleave(r, dim=2)                   # (B, 1, Q * r, L)
    out = F.scaled_dot_product_attention(qp, k.transpose(1, 2), v.transpose(1, 2), attn_mask=m, scale=scale)
    return out.view(B, G, Q, r, -1).permute(0, 2, 1, 3, 4).reshape(B, Q, H, -1)


def attend_reference(q, k, v, mask, scale):
    """Plain softmax attention in float32: the reference for `attend` and `mla_attend`."""
    rep = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(rep, dim=2).float()
    v = v.repeat_interleave(rep, dim=2).float()
    s = torch.einsum("bqhd,blhd->bhql", q.float(), k) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1)
    return torch.einsum("bhql,blhd->bqhd", p, v).to(q.dtype)


def mla_attend(q_nope: torch.Tensor, q_rot: torch.Tensor, latent_cache: torch.Tensor,
               w_uk: torch.Tensor, w_uv: torch.Tensor, mask: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """Multi-head latent attention on the compressed cache, with the key and
    value up-projections absorbed into the query and the output (DeepSeek-V2).

    q_nope (B, Q, H, n), q_rot (B, Q, H, r), latent_cache (B, L, C + r) holding
    [normed latent | rotated shared key], w_uk (H, n, C), w_uv (H, dv, C)
    -> (B, Q, H, dv). Keys are never decompressed: one latent row serves every head.
    """
    C = w_uk.shape[-1]
    q_lat = torch.einsum("bqhn,hnc->bqhc", q_nope, w_uk)
    q = torch.cat((q_lat, q_rot), dim=-1)                 # (B, Q, H, C + r)
    kv = latent_cache.unsqueeze(2)                        # (B, L, 1, C + r)
    o_lat = attend(q, kv, kv[..., :C], mask, scale)       # (B, Q, H, C)
    return torch.einsum("bqhc,hvc->bqhv", o_lat, w_uv)
