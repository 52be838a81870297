"""A request's life in the engine: its tokens, its place in the KV cache, its
randomness and its statistics. The engine owns requests; the scheduler only
orders them."""

from dataclasses import dataclass, field

import torch

from .params import SamplingParams


@dataclass
class CompletionStats:
    steps: int = 0                  # target forwards this request took part in (prefill included)
    draft_tokens: int = 0           # draft tokens proposed and verified
    accepted_tokens: int = 0        # of which accepted
    prompt_tokens: int = 0
    preemptions: int = 0            # times evicted and recomputed

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str              # "length" | "stop"
    stats: CompletionStats = field(default_factory=CompletionStats)


@dataclass
class StreamChunk:
    """What one step added to one request."""
    index: int                      # the prompt's position in the generate call
    token_ids: list[int]            # tokens committed this step
    text: str                       # text delta (held back while a character is incomplete)
    draft_tokens: int               # draft tokens proposed this step
    accepted_tokens: int            # of which accepted
    finished: bool
    finish_reason: str | None
    k: int = 0                      # draft length chosen for the step (the drafter may deliver fewer)


@dataclass
class Request:
    id: int
    index: int
    prompt: list[int]
    params: SamplingParams
    k: int                          # draft tokens per step for this request (0: no speculation); auto: the cap
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    num_cached: int = 0             # tokens of prompt + output in the target KV cache
    slot: int | None = None
    text: str = ""                  # decoded output (stop strings already cut)
    emitted: int = 0                # characters of text already streamed
    finish_reason: str | None = None
    auto: bool = False              # the controller chooses k each step (up to k)
    stats: CompletionStats = field(default_factory=CompletionStats)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def completion(self, with_text: bool) -> Completion:
        return Completion(self.prompt, self.output, self.text if with_text else None,
                          self.finish_reason or "length", self.stats)
