"""specmoe: serve Mixture-of-Experts models with expert parallelism and
cost-aware speculative decoding.

    from specmoe import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cpu", dtype="float32", speculation={"method": "ngram", "k": 4})
    eng.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from .router import Completion, CompletionStats, Engine, SamplingParams, SpeculationConfig, StreamChunk

__all__ = ["Engine", "SamplingParams", "SpeculationConfig", "Completion", "CompletionStats", "StreamChunk"]
__version__ = "0.1.0"
