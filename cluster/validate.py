"""GenerateRequest -> (prompt token ids, SamplingParams), or an InvalidRequest
naming the field that is wrong. Pure: no gRPC context, no engine state beyond
the model's vocabulary, context length and drafter."""

import math
from dataclasses import dataclass

from ..router.params import METHODS, SamplingParams

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """Bad input; the message starts with the field it names."""


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_seq_len: int                # prompt + new tokens per request
    method: str                     # the engine's drafter ("off" when it runs none)
    tokenizer: object | None = None  # tokenizers.Tokenizer, for text prompts


def prompt_ids(req, lim: ModelLimits) -> list[int]:
    which = req.WhichOneof("prompt")
    if which is None:
        raise InvalidRequest("prompt: empty (set text or token_ids)")
    if which == "text":
        try:
            text = req.text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"prompt.text: malformed UTF-8 at byte {e.start} ({e.reason})") from None
        if not text:
            raise InvalidRequest("prompt.text: empty prompt")
        if lim.tokenizer is None:
            raise InvalidRequest("prompt.text: this model has no tokenizer.json; send prompt.token_ids")
        ids = lim.tokenizer.encode(text).ids
        if not ids:
            raise InvalidRequest("prompt.text: encodes to no tokens")
        return ids
    ids = list(req.token_ids.ids)
    if not ids:
        raise InvalidRequest("prompt.token_ids: empty prompt")
    for i, t in enumerate(ids):
        if not 0 <= t < lim.vocab_size:
            raise InvalidRequest(f"prompt.token_ids[{i}]: token id {t} outside the vocabulary "
                                 f"0..{lim.vocab_size - 1}")
    return ids


def speculation(req, lim: ModelLimits):
    """The SamplingParams.speculation value the request asks for."""
    if not req.HasField("speculation"):
        return None
    s = req.speculation
    mode = s.mode or "auto"
    has_k = s.HasField("k")
    if mode in ("auto", "off"):
        if has_k:
            raise InvalidRequest(f"speculation.k: only allowed with a method, not with mode {mode!r}")
        return mode
    if mode not in METHODS:
        raise InvalidRequest(f"speculation.mode: unknown {mode!r}; use auto, off or one of {list(METHODS)}")
    if mode != lim.method:
        raise InvalidRequest(f"speculation.mode: {mode!r} needs a drafter this server does not run "
                             f"(its drafter: {lim.method!r})")
    spec = {"method": mode}
    if has_k:
        if not 0 <= s.k <= 64:
            raise InvalidRequest(f"speculation.k: must be in 0..64, got {s.k}")
        spec["k"] = s.k
    return spec


def parse_request(req, lim: ModelLimits) -> tuple[list[int], SamplingParams]:
    """Validate a GenerateRequest; raises InvalidRequest naming the field."""
    ids = prompt_ids(req, lim)
    cap = lim.max_seq_len
    if len(ids) >= cap:
        raise InvalidRequest(f"prompt: {len(ids)} tokens, longer than the context allows "
                             f"({cap} tokens including at least one new token)")
    if req.HasField("max_tokens"):
        m = req.max_tokens
        if m <= 0:
            raise InvalidRequest(f"max_tokens: must be >= 1, got {m}")
        if len(ids) + m > cap:
            raise InvalidRequest(f"max_tokens: {m} beyond the context: prompt {len(ids)} + max_tokens {m} "
                                 f"> {cap}")
    else:
        m = min(DEFAULT_MAX_TOKENS, cap - len(ids))
    temperature = req.temperature if req.HasField("temperature") else 0.0
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise InvalidRequest(f"temperature: must be a finite number >= 0, got {temperature}")
    top_p = req.top_p if req.HasField("top_p") else 1.0
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p: must be in (0, 1], got {top_p}")
    top_k = req.top_k if req.HasField("top_k") else 0
    if top_k < 0:
        raise InvalidRequest(f"top_k: must be >= 0, got {top_k}")
    for i, s in enumerate(req.stop):
        if not s:
            raise InvalidRequest(f"stop[{i}]: empty stop string")
    if req.stop and lim.tokenizer is None:
        raise InvalidRequest("stop: stop strings need a model with a tokenizer.json")
    spec = speculation(req, lim)
    try:
        params = SamplingParams(max_tokens=m, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                                seed=req.seed if req.HasField("seed") else None, stop=tuple(req.stop),
                                ignore_eos=req.ignore_eos, speculation=spec)
    except ValueError as e:   # SamplingParams names the field itself
        raise InvalidRequest(str(e)) from None
    return ids, params
