"""Verification of draft tokens against the target model, one request at a time.

Vocabulary as in vLLM's rejection sampler: draft tokens are *accepted* while
the target agrees; the first disagreement is replaced by a *recovered* token
(greedy: the target's argmax, the correction); when all k drafts are accepted
the target's last row gives one more, the *bonus* token. Either way a
verification commits num_accepted + 1 tokens.

Legend: k draft tokens, V vocabulary. Pure functions: tensors and token lists
in, (num_accepted, next_token) out; randomness only from the generator passed in.
"""

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


def verify_sampling(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                    generator: torch.Generator | None) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2022, Chen et al. 2023).

    target_probs (k+1, V) float32: the target's processed distributions p_j
    (see sampling.probs_from_logits). draft_probs (k, V): the distributions q_j
    the drafter sampled draft_tokens[j] from, or None for deterministic drafts
    (q_j one-hot at the draft token, e.g. n-gram lookup).

    Draft j is accepted with probability min(1, p_j(x)/q_j(x)); the first
    rejection samples the recovered token from norm(max(0, p_j - q_j)) (from
    p_j if that is all zero) and stops; if all k are accepted the bonus token
    is sampled from p_k. Every committed token is then distributed exactly as
    if sampled from the target. A draft with q_j(x) = 0 is rejected.

    Randomness: k uniforms, then one multinomial draw, all from `generator`
    (on target_probs' device), so equal generator states give equal results.
    Returns (num_accepted, next_token).
    """
    k = len(draft_tokens)
    _check_rows("target_probs", target_probs, k + 1, k)
    if draft_probs is not None:
        _check_rows("draft_probs", draft_probs, k, k)
    p = target_probs.float()                                            # (k+1, V)
    a = k
    if k:
        x = torch.tensor(draft_tokens, dtype=torch.long, device=p.device)  # (k,)
        px = p[:k].gather(1, x[:, None]).squeeze(1)                     # (k,)
        if draft_probs is None:
            qx = torch.ones_like(px)
        else:
            draft_probs = draft_probs.float()
            qx = draft_probs.gather(1, x[:, None]).squeeze(1)           # (k,)
        u = torch.rand(k, generator=generator, device=p.device)         # (k,) in [0, 1)
        # u < p/q has probability min(1, p/q); written as a product so q = 0 never divides.
        accepted = ((qx > 0) & (u * qx < px)).tolist()                   # one host sync
        a = accepted.index(False) if False in accepted else k
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
    return a, int(torch.multinomial(dist, 1, generator=generator))
