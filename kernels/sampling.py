"""Token selection from logits. Pure functions; randomness passed in.

Legend: n rows (requests or positions), V vocabulary.
"""

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (T, V) -> (T,) argmax token ids (ties to the lowest id, as torch.argmax)."""
    return logits.argmax(dim=-1)


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
    """logits (n, V) any float dtype -> probs (n, V) float32, each row summing to one.

    Order as in vLLM and transformers: divide by `temperature`, keep the top_k
    largest logits (every token tied with the k-th largest is kept), then keep
    the smallest set of most probable tokens whose cumulative probability
    reaches top_p (at least the top token; among equal probabilities the lower
    token id comes first), renormalise. top_k=0 and top_p=1.0 disable the filters.
    """
    if not temperature > 0:
        raise ValueError(f"temperature {temperature}: expected > 0 (temperature 0 is greedy decoding)")
    if top_k < 0:
        raise ValueError(f"top_k {top_k}: expected >= 0 (0 disables)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p {top_p}: expected in (0, 1] (1.0 disables)")
    x = logits.float() / temperature                                    # (n, V)
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]                      # (n, 1)
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(~nucleus(probs, top_p), 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs (n, V) -> (n, V) bool, the tokens top-p keeps: in order of
    decreasing probability (equal ones by ascending token id), a token is
    dropped when the tokens before it already reach top_p; the top token has
    nothing before it, so it stays (top_p > 0).

    The same mask as a stable sort of the whole row, without one (a sort of
    V = 32k floats takes ~2.8 ms on one CPU core, topk of 64 ~0.09 ms): the
    kept prefix's length K comes from the cumulative sum of the m largest
    values (m = 64, then 1024, then all of them while some row's nucleus
    reaches past its m-th token; all of them at once after 64 where those
    hold under top_p / 8), which is the sort's own prefix sum; the
    kept tokens are then those above the K-th value and, of those equal to
    it, the lowest ids. A flat row (a nucleus of thousands) costs about the
    sort; a peaked one (a trained model's) a fraction of it."""
    V = probs.shape[-1]
    m = min(64, V)
    while True:
        # the m largest values in decreasing order; all of them by a sort of the values (order among equal
        # values does not change them), which beats topk where m is a large part of V
        vals = probs.topk(m, dim=-1).values if m < V else probs.sort(dim=-1, descending=True).values
        kept = ((vals.cumsum(dim=-1) - vals) < top_p).sum(dim=-1)       # (n,) prefix length, >= 1
        more = kept >= m
        if m == V or not bool(more.any()):
            break
        # a row whose m largest hold under an eighth of top_p is flat: its nucleus is far wider, sort it
        m = V if m >= 1024 or bool((vals.sum(dim=-1)[more] < top_p / 8).any()) else min(1024, V)
    last = vals.gather(1, (kept - 1)[:, None])                          # (n, 1) the K-th value
    above = probs > last
    ties = probs == last
    need = kept[:, None] - above.sum(dim=-1, keepdim=True)              # ties kept, lowest ids first
    return above | (ties & (ties.cumsum(dim=-1) <= need))


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (n, V) -> (n,) int64 token ids, one draw per row from `generator`."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
