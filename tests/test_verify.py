"""Sampling and verification kernels against exact probabilities.

probs_from_logits is checked against a per-token loop in float64; the
speculative sampler statistically, against the distributions the theory
gives in closed form (Leviathan et al. 2022): committed tokens distributed
exactly as the target's, acceptance sum_x min(p(x), q(x)) per position.
Every statistical test uses fixed seeds, so it is deterministic; a correct
kernel fails one with probability about 0.001 over the choice of seed.
"""

import math

import pytest
import torch

from specmoe.kernels.sampling import greedy, nucleus, probs_from_logits, sample
from specmoe.kernels.verify import (draw_uniforms, sample_inverse_cdf, verify_greedy, verify_sampling,
                                   verify_sampling_u)

P_MIN = 1e-3          # chi-square p-value below which a distribution is declared wrong


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dists(seed: int, n: int, V: int, scale: float = 1.0) -> torch.Tensor:
    """(n, V) float32 random distributions with full support."""
    return (torch.randn(n, V, generator=_g(seed)) * scale).softmax(dim=-1)


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs` (same shape).
    Cells of probability 0 must be empty; they do not count as degrees of freedom."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    zero = probs == 0
    assert counts[zero].sum() == 0, f"{int(counts[zero].sum())} draws on tokens of probability 0"
    n = counts.sum()
    expected = n * probs[~zero]
    assert expected.min() >= 5, f"chi-square needs >= 5 expected per cell, got {expected.min():.1f}"
    chi2 = ((counts[~zero] - expected) ** 2 / expected).sum()
    df = int((~zero).sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), chi2 / 2))


def test_chi2_pvalue_helper_against_known_values():
    # chi-square survival function: df 1 is erfc(sqrt(x/2)), df 2 is exp(-x/2), df 7 at x=8 is 0.33259 (tables).
    assert _chi2_pvalue(torch.tensor([60.0, 40.0]), torch.tensor([0.5, 0.5])) == pytest.approx(math.erfc(math.sqrt(2)))
    assert _chi2_pvalue(torch.tensor([40.0, 30.0, 30.0]), torch.full((3,), 1 / 3)) == pytest.approx(math.exp(-1))
    sf = torch.special.gammaincc(torch.tensor(3.5, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64))
    assert float(sf) == pytest.approx(0.332594, abs=1e-6)


# --------------------------------------------------------------------------- probs_from_logits

def _reference_probs(row: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """One row, token by token, in float64: the definition, not the kernel's masks."""
    V = len(row)
    x = [v / temperature for v in row]
    keep = [True] * V
    if 0 < top_k < V:
        kth = sorted(x, reverse=True)[top_k - 1]
        keep = [v >= kth for v in x]
    m = max(x)
    e = [math.exp(v - m) if kept else 0.0 for v, kept in zip(x, keep)]
    probs = [v / sum(e) for v in e]
    if top_p < 1.0:
        chosen, total = set(), 0.0
        for i in sorted(range(V), key=lambda i: (-probs[i], i)):     # most probable first, then lower id
            chosen.add(i)
            total += probs[i]
            if total >= top_p:
                break
        probs = [p if i in chosen else 0.0 for i, p in enumerate(probs)]
        probs = [p / sum(probs) for p in probs]
    return probs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 1, 1.0), (1.0, 64, 1.0),
    (1.0, 0, 0.8), (0.8, 10, 0.6), (2.0, 3, 0.95), (0.5, 0, 0.3),
])
def test_probs_from_logits_matches_token_loop(temperature, top_k, top_p, dtype):
    # Integer logits: many ties, also at the top-k boundary; exact in bfloat16.
    ties = torch.randint(-4, 5, (12, 32), generator=_g(0)).float()
    smooth = torch.randn(4, 32, generator=_g(1)) * 2
    logits = torch.cat([ties, smooth]).to(dtype)
    got = probs_from_logits(logits, temperature, top_k, top_p)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    ref = torch.tensor([_reference_probs(r, temperature, top_k, top_p) for r in logits.double().tolist()],
                       dtype=torch.float64)
    assert torch.equal(got > 0, ref > 0), "kept token sets differ"
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=1e-5)


def _nucleus_by_stable_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p mask by a stable sort of every row (what sampling.nucleus avoids)."""
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
    return ~torch.zeros_like(drop).scatter_(1, order, drop)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_nucleus_equals_the_stable_sort_mask_on_large_vocabularies(top_p):
    """V = 3000: peaked rows (the nucleus inside the first 64 values), flat ones
    (far past them: the whole row is sorted), plateaus (past 64, inside 1024:
    the search widens to 1024), integer logits (ties at the boundary, lowest ids
    kept), and rows cut by top-k first; bit for bit."""
    V = 3000
    plateau = torch.zeros(2, V)
    plateau[0, :200] = 5.0                  # 200 equal tokens hold ~91%: a nucleus between 64 and 1024
    plateau[1, 1000:1300] = 5.0 + torch.randn(300, generator=_g(83)) * 0.1
    rows = [torch.randn(4, V, generator=_g(80)) * 6, torch.randn(4, V, generator=_g(81)) * 0.2,
            torch.randint(-3, 4, (4, V), generator=_g(82)).float(), torch.zeros(1, V), plateau]
    probs = torch.cat([probs_from_logits(torch.cat(rows), 1.0, top_k=k) for k in (0, 100)])
    got = nucleus(probs, top_p)
    assert torch.equal(got, _nucleus_by_stable_sort(probs, top_p))
    assert got.any(dim=-1).all()
    # each kind alone (a batch widens as far as its flattest row needs): the plateaus alone take the 1024 step
    for part in [*probs.split(4), probs[13:15]]:
        assert torch.equal(nucleus(part, top_p), _nucleus_by_stable_sort(part, top_p))
    if top_p == 0.9:        # the flat rows' nucleus is past 1024 tokens, the plateaus' between 64 and 1024
        width = got.sum(dim=-1)
        assert (width[4:8] > 1024).all() and ((width[13:15] > 64) & (width[13:15] < 1024)).all(), width


def test_top_k_ties_at_boundary_are_all_kept():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    probs = probs_from_logits(logits, 1.0, top_k=2)
    assert (probs > 0).tolist() == [[True, False, True, True, True, False]]


def test_top_p_boundary_reached_exactly():
    """Equal logits give exactly 1/4 each: top_p 0.5 is reached by two tokens,
    which are the two lowest ids."""
    probs = probs_from_logits(torch.zeros(1, 4), 1.0, top_p=0.5)
    assert probs.tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert (probs_from_logits(torch.zeros(1, 4), 1.0, top_p=0.75) > 0).tolist() == [[True, True, True, False]]


def test_temperature_divides_logits():
    logits = torch.randn(5, 20, generator=_g(2)) * 3
    for t in (0.25, 1.0, 4.0):
        exact = (logits.double() / t).exp()
        torch.testing.assert_close(probs_from_logits(logits, t).double(), exact / exact.sum(-1, keepdim=True),
                                   atol=1e-6, rtol=1e-5)
    # Higher temperature flattens: the top token loses probability.
    top = logits.argmax(-1, keepdim=True)
    assert (probs_from_logits(logits, 2.0).gather(1, top) < probs_from_logits(logits, 0.5).gather(1, top)).all()


def test_top_k_1_and_tiny_top_p_are_one_hot_at_argmax():
    logits = torch.randn(6, 50, generator=_g(3))
    onehot = torch.nn.functional.one_hot(greedy(logits), 50).float()
    assert torch.equal(probs_from_logits(logits, 0.9, top_k=1), onehot)
    assert torch.equal(probs_from_logits(logits, 1.7, top_p=1e-6), onehot)
    assert torch.equal(probs_from_logits(logits, 1.0, top_k=7, top_p=1e-6), onehot)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_rows_sum_to_one(dtype):
    logits = (torch.randn(9, 100, generator=_g(4)) * 5).to(dtype)
    for t, k, p in [(1.0, 0, 1.0), (0.3, 0, 1.0), (3.0, 20, 0.9), (1.0, 0, 0.5), (0.6, 2, 1.0)]:
        probs = probs_from_logits(logits, t, k, p)
        assert probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(9), atol=1e-5, rtol=0)
        assert (probs >= 0).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=0.0), "temperature 0.0: expected > 0"), (dict(temperature=-1.0), "temperature -1.0"),
    (dict(temperature=1.0, top_k=-1), "top_k -1"), (dict(temperature=1.0, top_p=0.0), "top_p 0.0"),
    (dict(temperature=1.0, top_p=1.5), "top_p 1.5"),
])
def test_probs_from_logits_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        probs_from_logits(torch.zeros(1, 4), **kwargs)


def test_sample_draws_from_probs():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3]]).expand(20000, 5)
    tokens = sample(probs, _g(5))
    assert tokens.dtype == torch.int64 and tokens.shape == (20000,)
    assert _chi2_pvalue(torch.bincount(tokens, minlength=5), probs[0]) > P_MIN
    assert torch.equal(sample(probs[:50], _g(6)), sample(probs[:50], _g(6)))


# --------------------------------------------------------------------------- verify_greedy

def _logits_with_argmax(best: list[int], V: int = 10) -> torch.Tensor:
    logits = torch.randn(len(best), V, generator=_g(7))
    logits[torch.arange(len(best)), best] = 10.0
    return logits


@pytest.mark.parametrize("drafts,expected", [
    ([3, 1, 4], (3, 1)),      # all accepted: bonus is the last row's argmax
    ([2, 1, 4], (0, 3)),      # first rejected: correction from row 0
    ([3, 1, 5], (2, 4)),      # last rejected
    ([3, 7, 4], (1, 1)),      # later drafts are not looked at after a rejection
    ([], (0, 3)),             # no drafts: plain decoding
])
def test_verify_greedy(drafts, expected):
    best = [3, 1, 4, 1]
    assert verify_greedy(_logits_with_argmax(best[:len(drafts) + 1]), drafts) == expected


def test_verify_greedy_rejects_wrong_row_count():
    with pytest.raises(ValueError, match=r"target_logits: shape \(4, 10\), expected \(3, V\) for 2 draft"):
        verify_greedy(_logits_with_argmax([1, 2, 3, 4]), [1, 2])


# --------------------------------------------------------------------------- verify_sampling

def _drafts(q: torch.Tensor, n: int, seed: int) -> list[list[int]]:
    """n trials of drafts, x_j ~ q_j independently: (n, k) as lists."""
    return torch.multinomial(q, n, replacement=True, generator=_g(seed)).T.tolist()


def _first_token(drafts: list[int], a: int, token: int) -> int:
    return drafts[0] if a > 0 else token


# The three shapes of support that the recovered distribution has to handle.
_V = 8
_P = _dists(10, 3, _V)
_Q = _dists(11, 3, _V, scale=1.5)
_SPARSE = probs_from_logits(torch.randn(3, _V, generator=_g(12)), 1.0, top_k=3)
CASES = {"dense": (_P, _Q), "target_top_k": (_SPARSE, _Q), "draft_top_k": (_P, _SPARSE)}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_first_token_is_target_distribution(case):
    p, q = CASES[case]                      # p (3, V) for k = 2, q (2, V)
    q = q[:2]
    n, gen = 20000, _g(20)
    counts, accepted0 = torch.zeros(_V), 0
    for drafts in _drafts(q, n, 21):
        a, token = verify_sampling(p, drafts, q, gen)
        counts[_first_token(drafts, a, token)] += 1
        accepted0 += a > 0
    assert _chi2_pvalue(counts, p[0]) > P_MIN
    beta = float(torch.minimum(p[0], q[0]).sum())
    se = math.sqrt(beta * (1 - beta) / n)
    assert abs(accepted0 / n - beta) < 3 * se, (accepted0 / n, beta)


def test_sampling_one_hot_drafts():
    """q=None (an n-gram drafter): output ~ p_0, acceptance of draft x is p_0(x)."""
    p, d = _P, _Q[:2]                       # d: how the test picks draft tokens; the kernel never sees it
    n, gen = 20000, _g(22)
    counts = torch.zeros(_V)
    accepted, expected, var = 0, 0.0, 0.0
    for drafts in _drafts(d, n, 23):
        a, token = verify_sampling(p, drafts, None, gen)
        counts[_first_token(drafts, a, token)] += 1
        accepted += a > 0
        px = float(p[0, drafts[0]])
        expected, var = expected + px, var + px * (1 - px)
    assert _chi2_pvalue(counts, p[0]) > P_MIN
    assert abs(accepted - expected) < 3 * math.sqrt(var), (accepted / n, expected / n)


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot"])
def test_sampling_joint_of_two_committed_tokens(one_hot):
    """k = 2: the first two committed tokens are jointly p_0(x1) p_1(x2). When
    only one token is committed (draft 0 rejected), the next verification, at
    the position whose target is p_1, gives the second."""
    V = 6
    p, q = _dists(30, 3, V, scale=0.6), _dists(31, 2, V)
    n, gen = 30000, _g(32)
    draft_probs = None if one_hot else q
    counts = torch.zeros(V, V)
    for drafts, redraft in zip(_drafts(q, n, 33), _drafts(q[1:], n, 34)):
        a, token = verify_sampling(p, drafts, draft_probs, gen)
        committed = drafts[:a] + [token]
        if len(committed) < 2:
            a2, token2 = verify_sampling(p[1:], redraft, None if one_hot else q[1:], gen)
            committed.append(_first_token(redraft, a2, token2))
        counts[committed[0], committed[1]] += 1
    assert _chi2_pvalue(counts, p[0][:, None] * p[1][None, :]) > P_MIN


@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot"])
def test_sampling_num_accepted_distribution(one_hot):
    """k = 3, fixed rows: P(a >= j) = prod_{m<j} beta_m, beta_m the acceptance
    probability at position m: sum_x min(p_m, q_m) (one-hot: sum_x q_m(x) p_m(x),
    q_m being how the test picks drafts)."""
    p, q = _dists(40, 4, _V, scale=0.8), _dists(41, 3, _V, scale=0.8)
    beta = ((q * p[:3]) if one_hot else torch.minimum(p[:3], q)).sum(-1).double()
    at_least = torch.cat([torch.ones(1, dtype=torch.float64), beta.cumprod(0)])           # P(a >= j), j = 0..3
    exact = at_least - torch.cat([at_least[1:], torch.zeros(1, dtype=torch.float64)])     # P(a = j)
    n, gen = 20000, _g(42)
    counts = torch.zeros(4)
    for drafts in _drafts(q, n, 43):
        counts[verify_sampling(p, drafts, None if one_hot else q, gen)[0]] += 1
    assert _chi2_pvalue(counts, exact) > P_MIN


def test_sampling_bonus_token_is_last_target_row():
    """q == p: every draft is accepted (p/q = 1) and the bonus token ~ p_k."""
    p = _P
    gen, counts = _g(44), torch.zeros(_V)
    for drafts in _drafts(p[:2], 5000, 45):
        a, token = verify_sampling(p, drafts, p[:2].clone(), gen)
        assert a == 2
        counts[token] += 1
    assert _chi2_pvalue(counts, p[2]) > P_MIN


def test_sampling_no_drafts_samples_bonus_from_target():
    p = _P[:1]
    gen, counts = _g(50), torch.zeros(_V)
    for _ in range(5000):
        a, token = verify_sampling(p, [], None, gen)
        assert a == 0
        counts[token] += 1
    assert _chi2_pvalue(counts, p[0]) > P_MIN


def test_sampling_zero_draft_probability_rejects():
    """q_0(x) = 0 (cannot come from the drafter): rejected, recovered ~ norm(max(0, p - q))."""
    p, q = _P[:2], _SPARSE[:1]
    x = int((q[0] == 0).nonzero()[0])
    gen, counts = _g(51), torch.zeros(_V)
    for _ in range(5000):
        a, token = verify_sampling(p, [x], q, gen)
        assert a == 0
        counts[token] += 1
    residual = (p[0] - q[0]).clamp_min(0)
    assert _chi2_pvalue(counts, residual / residual.sum()) > P_MIN


def test_sampling_equal_target_and_draft_falls_back_to_target():
    """p == q: max(0, p - q) is all zero; a forced rejection samples from p."""
    p = _SPARSE[:2]
    x = int((p[0] == 0).nonzero()[0])
    gen, counts = _g(52), torch.zeros(_V)
    for _ in range(5000):
        a, token = verify_sampling(p, [x], p[:1].clone(), gen)
        assert a == 0
        counts[token] += 1
    assert _chi2_pvalue(counts, p[0]) > P_MIN


def test_sampling_certain_and_impossible_drafts():
    one = torch.zeros(3, _V)
    one[:, 2] = 1.0
    gen = _g(53)
    for _ in range(200):
        assert verify_sampling(one, [2, 2], None, gen) == (2, 2)        # p(x) = 1: always accepted
        a, token = verify_sampling(_SPARSE[:2], [int((_SPARSE[0] == 0).nonzero()[0])], None, gen)
        assert a == 0 and _SPARSE[0, token] > 0                          # p(x) = 0: always rejected


def test_sampling_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"draft_probs: shape \(3, 8\), expected \(2, V\) for 2 draft"):
        verify_sampling(_P, [0, 1], _dists(0, 3, _V), None)
    with pytest.raises(ValueError, match=r"target_probs: shape \(3, 8\), expected \(2, V\) for 1 draft"):
        verify_sampling(_P, [0], None, None)


def test_sampling_is_a_function_of_the_generator_seed():
    p, q = _P, _Q[:2]
    drafts = _drafts(q, 300, 60)

    def run(seed: int, draft_probs):
        gen = _g(seed)
        return [verify_sampling(p, d, draft_probs, gen) for d in drafts]

    for draft_probs in (q, None):
        assert run(61, draft_probs) == run(61, draft_probs)
        assert run(61, draft_probs) != run(62, draft_probs)


# --------------------------------------------------------------------------- given uniforms (an EP worker)

def test_verify_sampling_is_verify_sampling_u_on_the_generators_uniforms():
    """The generator path is the uniforms path on draw_uniforms' k + 1 uniforms,
    and leaves the generator where a uniforms-path caller leaves it."""
    p, q = _P, _Q[:2]
    for drafts in _drafts(q, 50, 70):
        for draft_probs in (q, None):
            g1, g2 = _g(71), _g(71)
            want = verify_sampling(p, drafts, draft_probs, g1)
            u = draw_uniforms(len(drafts), g2)
            assert len(u) == 3 and all(0.0 <= x < 1.0 for x in u)
            assert verify_sampling_u(p, drafts, draft_probs, u) == want
            assert torch.equal(g1.get_state(), g2.get_state())


def test_verify_sampling_u_coins_decide_acceptance_at_p_over_q():
    """Draft j is accepted iff u_j < p_j(x) / q_j(x): checked on both sides of the threshold."""
    p, q = _P, _Q[:2]
    x = [int(q[0].argmax()), int(q[1].argmax())]
    r0 = float(p[0, x[0]] / q[0, x[0]])
    r1 = float(p[1, x[1]] / q[1, x[1]])
    assert r0 < 1 and r1 < 1, (r0, r1)
    assert verify_sampling_u(p, x, q, [r0 * 0.999, r1 * 0.999, 0.5])[0] == 2
    assert verify_sampling_u(p, x, q, [r0 * 0.999, r1 * 1.001, 0.5])[0] == 1
    assert verify_sampling_u(p, x, q, [r0 * 1.001, 0.0, 0.5])[0] == 0
    px = float(p[0, x[0]])                                           # one-hot: accepted iff u < p(x)
    assert verify_sampling_u(p, x, None, [px * 0.999, 1.0 - 1e-12, 0.5])[0] == 1
    assert verify_sampling_u(p, x, None, [px * 1.001, 0.0, 0.5])[0] == 0
    with pytest.raises(ValueError, match="2 uniforms for 2 draft tokens, expected 3"):
        verify_sampling_u(p, x, q, [0.1, 0.2])


def test_inverse_cdf_draws_exact_probabilities_and_never_a_zero_weight_token():
    w = _SPARSE[0] * 3.0                                             # unnormalised, zeros inside and at the ends
    n, gen = 20000, _g(72)
    counts = torch.zeros(_V)
    for u in torch.rand(n, generator=gen, dtype=torch.float64).tolist():
        counts[sample_inverse_cdf(w, u)] += 1
    assert _chi2_pvalue(counts, w / w.sum()) > P_MIN
    nz = (w > 0).nonzero().flatten().tolist()
    # the ends of [0, 1): the first and the last token of positive weight, whatever the zeros around them
    assert sample_inverse_cdf(w, 0.0) == nz[0]
    assert sample_inverse_cdf(w, 1.0 - 2.0 ** -53) == nz[-1]
    edge = torch.zeros(_V)
    edge[3] = 1.0
    for u in (0.0, 0.5, 1.0 - 2.0 ** -53):
        assert sample_inverse_cdf(edge, u) == 3


def test_accept_greedy_on_host_ids_matches_verify_greedy():
    from specmoe.kernels.verify import accept_greedy, verify_greedy
    g = torch.Generator().manual_seed(5)
    for k in range(0, 5):
        logits = torch.randn(k + 1, 7, generator=g)
        best = logits.argmax(-1).tolist()
        for draft in (best[:k], [(t + 1) % 7 for t in best[:k]], best[:k // 2] + [(t + 1) % 7 for t in best[k // 2:k]]):
            assert accept_greedy(best, draft) == verify_greedy(logits, draft)
    with pytest.raises(ValueError, match="3 target ids for 1 draft tokens"):
        accept_greedy([1, 2, 3], [1])
