"""Assertions several test modules share (conftest puts this folder on sys.path)."""


def assert_same_or_near_tie(eng, prompt, want, got):
    """Equal token for token; a divergence passes only where the target's top-2
    logit gap at that position (`eng`: an engine on the target, teacher-forced)
    is below 1e-5, a proven near-tie."""
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
    top2 = eng.logits(prompt + want[:i])[-1].topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap < 1e-5, f"diverged at token {i}: {want[i]} vs {got[i]}, top-2 gap {gap:.3g} is no near-tie"
