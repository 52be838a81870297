"""Speculative sampling through the whole engine keeps the target's
distribution: a tiny-vocabulary target and draft model pair, 20,000 seeded
requests, the first three generated tokens against the exact target
probabilities computed by transformers (nobody here wrote them)."""

import pytest
import torch

from specmoe import Engine, SamplingParams

V, N, T = 16, 20_000, 0.9
PROMPT = [3, 7, 1, 12, 5]
P_MIN = 1e-3


def _model(seed, path, layers, hidden):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                     num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                     initializer_range=0.1, eos_token_id=None, bos_token_id=None)).eval()
    m.save_pretrained(path)
    return m


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = ((obs - exp) ** 2 / exp).sum()
    return torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2.0, dtype=torch.float64), stat / 2).item()


@pytest.mark.slow
@pytest.mark.parametrize("case, N", [("k2", N), ("k2-confidence-stop", 6_000), ("ngram", 6_000)],
                         ids=["k2", "k2-confidence-stop", "ngram"])
def test_speculative_sampling_matches_exact_target_distribution(tmp_path, case, N):
    """With a confidence stop the drafter stops after a draft it drew with
    q(x) below a threshold chosen so that about half the first drafts stop (a
    rule on the drafter's side only): still exact, on fewer samples. With
    n-gram drafts (one-hot, from a prompt that repeats) the verification runs
    inside the runner on the uniforms the engine drew (ModelRunner.run(sample=)),
    where an EP worker runs it."""
    confidence_stop = case == "k2-confidence-stop"
    prompt = PROMPT if case != "ngram" else [3, 7, 1, 3, 7, 1, 3]
    target = _model(0, tmp_path / "t", 2, 32)
    draft = _model(1, tmp_path / "d", 1, 16)
    with torch.no_grad():
        pt = lambda m, seqs: torch.softmax(m(torch.tensor(seqs)).logits[:, -1].double() / T, -1)  # noqa: E731
        p1 = pt(target, [prompt])[0]                                              # (V,)
        p2 = pt(target, [prompt + [a] for a in range(V)])                          # (V, V): p(x2 | x1)
        p3 = pt(target, [prompt + [a, b] for a in range(V) for b in range(V)])     # (V*V, V)
        q1 = pt(draft, [prompt])[0]
    joint12 = p1[:, None] * p2                                                     # (V, V)
    marg3 = (joint12.reshape(-1, 1) * p3).sum(0)
    assert 0.2 < (p1.max() - p1.min()).item() and torch.minimum(p1, q1).sum() < 0.95   # neither flat nor equal
    min_confidence = 0.0
    if confidence_stop:      # halfway between the two q1 values where the mass of smaller ones passes 1/2
        q = q1.sort().values
        i = int((q.cumsum(0) < 0.5).sum())
        min_confidence = float(q[i - 1] + q[i]) / 2

    spec = ({"method": "ngram", "k": 2} if case == "ngram" else
            {"method": "draft_model", "k": 2, "draft_model": str(tmp_path / "d"), "min_confidence": min_confidence})
    eng = Engine.from_pretrained(tmp_path / "t", max_batch=64, max_seq_len=16, speculation=spec)
    params = [SamplingParams(max_tokens=3, temperature=T, seed=i, ignore_eos=True) for i in range(N)]
    toks = torch.zeros(N, 3, dtype=torch.long)
    first_step_accepted = torch.zeros(N, dtype=torch.long)
    first_step_drafted = torch.zeros(N, dtype=torch.long)
    seen = torch.zeros(N, dtype=torch.bool)
    filled = [0] * N
    for c in eng.generate_stream([prompt] * N, params):
        if not seen[c.index]:
            seen[c.index] = True
            first_step_accepted[c.index] = c.accepted_tokens
            first_step_drafted[c.index] = c.draft_tokens
        toks[c.index, filled[c.index]:filled[c.index] + len(c.token_ids)] = torch.tensor(c.token_ids)
        filled[c.index] += len(c.token_ids)
    assert all(f == 3 for f in filled)
    stopped = (first_step_drafted == 1).double().mean().item()
    if confidence_stop:      # the first draft's q is below the threshold often enough to matter, not always
        assert 0.2 < stopped < 0.8, (stopped, min_confidence)
    elif case == "ngram":    # the lookup of the prompt's last token finds "7, 1" after its earlier 3s
        assert (first_step_drafted == 2).all()
    else:
        assert stopped == 0

    assert chi2_pvalue(torch.bincount(toks[:, 0], minlength=V), p1) > P_MIN
    assert chi2_pvalue(torch.bincount(toks[:, 0] * V + toks[:, 1], minlength=V * V), joint12.reshape(-1)) > P_MIN
    assert chi2_pvalue(torch.bincount(toks[:, 2], minlength=V), marg3) > P_MIN

    # The first draft of the first step is drawn from q1 (n-gram: it is 7) and verified against p1.
    rate = (first_step_accepted >= 1).double().mean().item()
    expected = (p1[7] if case == "ngram" else torch.minimum(p1, q1).sum()).item()
    se = (expected * (1 - expected) / N) ** 0.5
    assert abs(rate - expected) < 3 * se, (rate, expected, se)

    # The same seeds give the same samples.
    again = eng.generate([prompt] * 50, params[:50])
    assert [o.token_ids for o in again] == toks[:50].tolist()
