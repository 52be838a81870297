"""Token selection from logits. Pure functions; randomness passed in."""

import torch


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits (T, V) -> (T,) argmax token ids (ties to the lowest id, as torch.argmax)."""
    return logits.argmax(dim=-1)
