"""The engine loop: scheduling, speculation control, the step plan."""

from .engine import Engine
from .params import SamplingParams, SpeculationConfig
from .request import Completion, CompletionStats, StreamChunk

__all__ = ["Engine", "SamplingParams", "SpeculationConfig", "Completion", "CompletionStats", "StreamChunk"]
