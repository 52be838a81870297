"""Request and speculation parameters: frozen msgspec structs validated at
construction, every field with a default and a one-line doc."""

import msgspec

METHODS = ("ngram", "draft_model", "layer_skip")   # what the serving API may name


class SpeculationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    method: str = "off"             # off | ngram | draft_model | layer_skip
    k: int = 4                      # draft tokens per step (with auto: the most the controller may choose)
    auto: bool = False              # the controller picks k per step and request (0..k) from its cost model
    draft_model: str | None = None  # draft_model: path of a checkpoint with the target's vocabulary
    layers: int | list[int] | None = None  # layer_skip: the first L' layers, or an explicit subset
    min_n: int = 1                  # ngram: shortest suffix matched
    max_n: int = 3                  # ngram: longest suffix matched
    min_confidence: float = 0.0     # draft_model / layer_skip: stop drafting after a draft the drafter
                                    # gives less probability than this (0: always draft k)

    def __post_init__(self):
        if self.method != "off" and self.method not in METHODS:
            hint = " (synthetic drafters are for Python benchmarks only)" if self.method == "synthetic" else ""
            raise ValueError(f"speculation method {self.method!r} unknown; use 'off' or one of {list(METHODS)}{hint}")
        if not 0 <= self.k <= 64:
            raise ValueError(f"speculation k must be in 0..64, got {self.k}")
        if self.method == "draft_model" and not self.draft_model:
            raise ValueError("speculation method 'draft_model' needs 'draft_model': a checkpoint path")
        if not 0.0 <= self.min_confidence < 1.0:
            raise ValueError(f"speculation min_confidence must be in [0, 1), got {self.min_confidence!r}")
        if self.min_confidence and self.method not in ("draft_model", "layer_skip"):
            raise ValueError(f"speculation min_confidence applies to draft_model and layer_skip, "
                             f"not {self.method!r}")
        if self.method == "layer_skip" and self.layers is None:
            raise ValueError("speculation method 'layer_skip' needs 'layers': a count or a list of layer indices")

    @property
    def enabled(self) -> bool:
        return self.method != "off" and self.k > 0


AUTO_K_MAX = 8


def parse_speculation(spec) -> SpeculationConfig:
    """'off', 'auto' (n-gram drafting, the controller choosing k in 0..8 per
    step and request), a dict of SpeculationConfig fields (add "auto": true to
    let the controller choose up to "k"), or a SpeculationConfig."""
    if spec is None or spec == "off":
        return SpeculationConfig()
    if spec == "auto":
        return SpeculationConfig(method="ngram", k=AUTO_K_MAX, auto=True)
    if isinstance(spec, SpeculationConfig):
        return spec
    if isinstance(spec, dict):
        try:
            return msgspec.convert(spec, SpeculationConfig)
        except msgspec.ValidationError as e:
            raise ValueError(f"speculation {spec!r}: {e}") from None
    raise ValueError(f"speculation must be 'off', 'auto' or a dict, got {spec!r}")


class SamplingParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_tokens: int = 16            # new tokens per prompt at most
    temperature: float = 0.0        # 0: greedy
    top_k: int = 0                  # keep the k most likely tokens, 0: off
    top_p: float = 1.0              # nucleus: smallest set with probability >= top_p, 1.0: off
    seed: int | None = None         # per-request generator seed; None: drawn at random
    stop: tuple[str, ...] = ()      # strings that end the output (not included in the text)
    stop_token_ids: tuple[int, ...] = ()  # token ids that end the output (kept in token_ids)
    ignore_eos: bool = False        # keep going past end-of-sequence tokens
    speculation: str | dict | None = None  # None: the engine's; "off"; "auto" (controller); {"k": n} (fixed)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.speculation not in (None, "off", "auto") and not isinstance(self.speculation, dict):
            raise ValueError(f"speculation must be None, 'off', 'auto' or a dict, got {self.speculation!r}")
