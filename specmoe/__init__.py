"""specmoe: serve Mixture-of-Experts models with expert parallelism and
cost-aware speculative decoding.

    from specmoe import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cpu", dtype="float32")
    eng.generate(["Hello"], SamplingParams(max_tokens=32))
"""

from .router.engine import Completion, CompletionStats, Engine, SamplingParams

__all__ = ["Engine", "SamplingParams", "Completion", "CompletionStats"]
__version__ = "0.1.0"
