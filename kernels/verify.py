"""Verification of draft tokens against the target model, one request at a time.

Vocabulary as in vLLM's rejection sampler: draft tokens are *accepted* while
the target agrees; the first disagreement is replaced by a *recovered* token
(greedy: the target's argmax, the correction); when all k drafts are accepted
the target's last row gives one more, the *bonus* token. Either way a
verification commits num_accepted + 1 tokens.

Legend: k draft tokens, V vocabulary. Pure functions: tensors and token lists
in, (num_accepted, next_token) out; randomness only from the generator or the uniforms passed in.
"""

from typing import NamedTuple

import torch


def _check_rows(name: str, t: torch.Tensor, rows: int, k: int) -> None:
    if t.dim() != 2 or t.shape[0] != rows:
        raise ValueError(f"{name}: shape {tuple(t.shape)}, expected ({rows}, V) for {k} draft tokens")


def verify_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> tuple[int, int]:
    """target_logits (k+1, V): row j follows the prefix and the first j drafts.

    Accepts drafts while draft_tokens[j] == argmax(row j); returns
    (num_accepted a, argmax(row a)): the correction when a < k, the bonus when a == k.
    """
    k = len(draft_tokens)
    _check_rows("target_logits", target_logits, k + 1, k)
    return accept_greedy(target_logits.argmax(dim=-1).tolist(), draft_tokens)   # one host sync


def accept_greedy(target_ids: list[int], draft_tokens: list[int]) -> tuple[int, int]:
    """verify_greedy on the rows' argmax ids already on the host (k+1 of them),
    so an engine can take the argmax of a whole batch with one sync."""
    k = len(draft_tokens)
    if len(target_ids) != k + 1:
        raise ValueError(f"{len(target_ids)} target ids for {k} draft tokens, expected {k + 1}")
    a = 0
    while a < k and draft_tokens[a] == target_ids[a]:
        a += 1
    return a, target_ids[a]


class SampleSpec(NamedTuple):
    """Everything a verification of one-hot drafts needs besides the target's
    rows, so it can run where the rows are (an EP worker) and only the result
    travels: the request's sampling settings and the uniforms `draw_uniforms`
    took from its generator. The drafts are the chunk's last len(u) - 1 tokens."""
    temperature: float
    top_k: int
    top_p: float
    u: list[float]


def draw_uniforms(k: int, generator: torch.Generator | None) -> list[float]:
    """The k + 1 uniforms in [0, 1) a verification of k drafts consumes, from
    the request's generator: k acceptance coins, then the draw of the committed
    token (recovered or bonus). Always k + 1, whatever the outcome, so the
    generator's state after a step does not depend on where the rows were."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(k + 1, generator=generator, dtype=torch.float64, device=device).tolist()


def sample_inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose cumulative weight first exceeds u * total (weights (V,)
    non-negative, not all zero; u in [0, 1)): token i with probability
    weights[i] / total; a zero-weight token is never chosen (its cumulative
    weight equals its predecessor's)."""
    c = weights.double().cumsum(0)
    x = c[-1:] * u
    i = int(torch.searchsorted(c, x, right=True))
    if i >= c.shape[0]:         # u * total rounded up to the total: the last token of positive weight
        i = int(torch.nonzero(weights > 0)[-1])
    return i


def verify_sampling(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2022, Chen et al. 2023), with
    its randomness from `generator`: verify_sampling_u on the k + 1 uniforms
    `draw_uniforms` takes from it, so equal generator states give equal results."""
    return verify_sampling_u(target_probs, draft_tokens, draft_probs, draw_uniforms(len(draft_tokens), generator))


def verify_sampling_u(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                      u: list[float]) -> tuple[int, int]:
    """Speculative sampling on given uniforms.

    target_probs (k+1, V) float32: the target's processed distributions p_j
    (see sampling.probs_from_logits). draft_probs (k, V): the distributions q_j
    the drafter sampled draft_tokens[j] from, or None for deterministic drafts
    (q_j one-hot at the draft token, e.g. n-gram lookup). u: k + 1 uniforms
    in [0, 1) (`draw_uniforms`).

    Draft j is accepted when u[j] < p_j(x)/q_j(x), i.e. with probability
    min(1, p_j(x)/q_j(x)); the first rejection samples the recovered token from
    norm(max(0, p_j - q_j)) (from p_j if that is all zero) and stops; if all k
    are accepted the bonus token is sampled from p_k. Either draw is the
    inverse CDF at u[k]. Every committed token is then distributed exactly as
    if sampled from the target. A draft with q_j(x) = 0 is rejected.
    Returns (num_accepted, next_token).
    """
    k = len(draft_tokens)
    _check_rows("target_probs", target_probs, k + 1, k)
    if draft_probs is not None:
        _check_rows("draft_probs", draft_probs, k, k)
    if len(u) != k + 1:
        raise ValueError(f"{len(u)} uniforms for {k} draft tokens, expected {k + 1}")
    p = target_probs.float()                                            # (k+1, V)
    a = k
    if k:
        x = torch.tensor(draft_tokens, dtype=torch.long, device=p.device)  # (k,)
        px = p[:k].gather(1, x[:, None]).squeeze(1).tolist()            # (k,) one host sync
        if draft_probs is None:
            qx = [1.0] * k
        else:
            draft_probs = draft_probs.float()
            qx = draft_probs.gather(1, x[:, None]).squeeze(1).tolist()
        # u < p/q has probability min(1, p/q); written as a product so q = 0 never divides.
        a = next((j for j in range(k) if not (qx[j] > 0 and u[j] * qx[j] < px[j])), k)
    if a == k:
        dist = p[k]                                                     # bonus
    else:
        if draft_probs is None:
            q = torch.zeros_like(p[a])
            q[draft_tokens[a]] = 1.0
        else:
            q = draft_probs[a]
        dist = (p[a] - q).clamp_min(0.0)                                # recovered, unnormalised
        if not dist.sum() > 0:                                          # p == q: nothing left over
            dist = p[a]
    return a, sample_inverse_cdf(dist, u[k])
