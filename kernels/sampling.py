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
        # Stable sort: equal probabilities keep ascending token order.
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        # A token is dropped when the more probable tokens before it already reach
        # top_p; the top token has nothing before it, so it stays (top_p > 0).
        drop_sorted = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs (n, V) -> (n,) int64 token ids, one draw per row from `generator`."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
