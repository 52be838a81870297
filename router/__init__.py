"""The engine loop: scheduling, speculation control, the step plan."""

from .engine import Completion, CompletionStats, Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "CompletionStats"]
