"""specmoe: serve Mixture-of-Experts models with expert parallelism and
cost-aware speculative decoding.

    from specmoe import Engine, SamplingParams
    eng = Engine.from_pretrained(path, device="cpu", dtype="float32", speculation={"method": "ngram", "k": 4})
    eng.generate(["Hello"], SamplingParams(max_tokens=32))

    from specmoe import Client            # a `specmoe serve` server over gRPC
    for chunk in Client("127.0.0.1:50051").generate("Hello", max_tokens=32):
        print(chunk.text, end="")
"""

from .router import Completion, CompletionStats, Engine, SamplingParams, SpeculationConfig, StreamChunk

__all__ = ["Engine", "SamplingParams", "SpeculationConfig", "Completion", "CompletionStats", "StreamChunk",
           "Client"]
__version__ = "0.1.0"


def __getattr__(name):
    # The gRPC client loads grpc and the generated protobuf code: only when asked for.
    if name == "Client":
        from .cluster.client import Client
        return Client
    raise AttributeError(f"module 'specmoe' has no attribute {name!r}")
