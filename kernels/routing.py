"""Router scoring: which K experts each token goes to, with what weight.

Legend: T tokens, E experts, K experts per token, N groups.
All functions return (weights (T, K) float32, ids (T, K) int64).
"""

import torch


def softmax_topk(logits: torch.Tensor, k: int, renormalize: bool):
    """Mixtral / Qwen-MoE / OLMoE: softmax over all experts, keep the top k,
    optionally renormalise the kept probabilities to sum to one."""
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sigmoid_grouped_topk(logits: torch.Tensor, k: int, bias: torch.Tensor, n_group: int,
                         topk_group: int, renormalize: bool, scale: float):
    """DeepSeek-V3: sigmoid scores; the correction bias steers selection only;
    experts are chosen inside the topk_group groups whose two best biased
    scores sum highest; weights are the unbiased scores (renormalised), times
    the routed scaling factor."""
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    T, E = choice.shape
    if n_group > 1 and topk_group < n_group:
        grouped = choice.view(T, n_group, E // n_group)
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)          # (T, N)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1, sorted=False)[1], True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, ids
