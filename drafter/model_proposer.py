"""Model-based drafting: a small draft model, or the target's own first layers.

Both run autoregressively over a KV cache of their own, through a
`ModelRunner`:

- draft model: a separate checkpoint (any family, dense or MoE) with the
  target's vocabulary, run over its runner's cache;
- layer skip (self-speculation): a subset of the target's layers, then its
  final norm and LM head, run on the target's runner over a separate cache
  holding only those layers' KV; no extra weights.

Ownership: the proposer owns one cache slot and the list of tokens that slot
holds per request. Each `propose` re-syncs that list against the committed
tokens: the common prefix stays, the rest is recomputed in the first (batched)
forward, so rejected drafts are rolled back and the all-accepted case (whose
last draft and bonus token were never fed to the draft) is caught up without
any callback from the engine.
"""

from dataclasses import dataclass

import torch

from ..experts.batch import Chunk
from ..experts.checkpoint import read_checkpoint
from ..experts.config import ModelConfig
from ..experts.runner import ModelRunner
from ..kernels.sampling import probs_from_logits, sample
from .base import DraftInput, Proposal, Proposer


@dataclass
class _Seq:
    slot: int
    cached: list[int]        # the tokens in the slot, positions 0..len-1
    committed: int = 0       # len(tokens) at the last call: normally still a common prefix


def _check_layers(ids: list[int], N: int) -> None:
    """A layer subset must be non-empty, sorted, unique, within 0..N-1 and skip at least one layer."""
    if not ids:
        raise ValueError("layer skip: the layer list is empty")
    if any(not isinstance(i, int) for i in ids) or ids != sorted(set(ids)):
        raise ValueError(f"layer skip: layers {ids} must be sorted, unique integers")
    if ids[0] < 0 or ids[-1] >= N:
        raise ValueError(f"layer skip: layers {ids} outside 0..{N - 1}")
    if len(ids) >= N:
        raise ValueError(f"layer skip: layers {ids} are all {N} layers of the target; skip at least one")


def _common_prefix(cached: list[int], tokens: list[int], hint: int) -> int:
    """Length of the common prefix; `hint` is a length that usually matches
    (compared in one C-level slice comparison before the element loop)."""
    n = min(len(cached), len(tokens))
    start = hint if hint <= n and cached[:hint] == tokens[:hint] else 0
    for i in range(start, n):
        if cached[i] != tokens[i]:
            return i
    return n


class ModelProposer(Proposer):
    """Drafts autoregressively with `runner`'s model (only `layer_ids` of it,
    if given) over a KV cache of max_seqs slots x max_seq_len positions.

    Temperature 0: argmax drafts, probs None. Temperature > 0: each draft is
    sampled with the request's generator from probs_from_logits(temperature,
    top_k, top_p), and those rows are returned as the proposal's probs.
    At most max_seq_len - len(tokens) + 1 tokens are drafted (the cache's room).

    min_confidence > 0 stops a request's drafting early, after a draft whose
    probability under the drafter (softmax of its logits; for a sampled draft
    the filtered distribution it was drawn from) is below it: that draft is
    kept, no further one is made. Like transformers' assistant confidence
    threshold, it spares the draft forwards and the verified tokens (on an MoE
    target: the experts they load) that would most likely be rejected. The
    rule reads the drafter's side only, so sampling stays exact. It needs every
    draft row's logits (not only the argmax), so under expert parallelism a
    layer-skip drafter's greedy rows then cross the control plane in full."""

    def __init__(self, runner: ModelRunner, layer_ids: list[int] | None = None, max_seqs: int = 8,
                 max_seq_len: int = 2048, name: str = "draft_model", min_confidence: float = 0.0):
        if max_seqs < 1 or max_seq_len < 1:
            raise ValueError(f"{name}: max_seqs and max_seq_len must be >= 1, got {max_seqs}, {max_seq_len}")
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"{name}: min_confidence must be in [0, 1), got {min_confidence!r}")
        self.min_confidence = float(min_confidence)
        if max_seq_len > runner.model.max_positions:
            raise ValueError(f"{name}: max_seq_len {max_seq_len} exceeds the model's rotary table of "
                             f"{runner.model.max_positions} positions")
        self.runner, self.name = runner, name
        self.layer_ids = None if layer_ids is None else list(layer_ids)
        if self.layer_ids is not None:
            _check_layers(self.layer_ids, runner.config.num_layers)
        own = runner.cache
        if self.layer_ids is None and (own.num_slots, own.capacity) == (max_seqs, max_seq_len):
            self.cache = own     # a draft model's runner: its cache is the draft cache
        else:
            # Made by the runner, so under expert parallelism it lives on the workers.
            self.cache = runner.new_cache(max_seqs, max_seq_len,
                                          num_layers=None if self.layer_ids is None else len(self.layer_ids))
        self._seqs: dict[int, _Seq] = {}

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    def catch_up(self, req_id: int, num_tokens: int) -> int:
        seq = self._seqs.get(req_id)
        return max(0, num_tokens - (len(seq.cached) if seq is not None else 0))

    def release(self, req_id: int) -> None:
        seq = self._seqs.pop(req_id, None)
        if seq is not None:
            self.cache.free(seq.slot)

    def _run(self, chunks: list[Chunk], inputs: list[DraftInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each chunk's last-token argmax (B,) and the logits rows of the sampled
        inputs only (greedy drafts need no more, which under EP keeps their
        rows off the control plane), or of every input with min_confidence."""
        out = self.runner.run(chunks, cache=self.cache, layer_ids=self.layer_ids,
                              full=[self.min_confidence > 0 or inp.temperature > 0 for inp in inputs])
        return out.argmax, out.logits

    def propose(self, inputs: list[DraftInput]) -> list[Proposal]:
        ids = [inp.req_id for inp in inputs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{self.name}: a request id appears twice in one propose call: {ids}")
        out = [Proposal([]) for _ in inputs]
        live, chunks = [], []            # indices of inputs that draft; their first chunks
        want: dict[int, int] = {}        # input index -> drafts to make
        for i, inp in enumerate(inputs):
            n = len(inp.tokens)
            if inp.k < 1 or n < 1:
                raise ValueError(f"request {inp.req_id}: needs k >= 1 and at least one token, "
                                 f"got k={inp.k}, {n} tokens")
            want[i] = min(inp.k, self.cache.capacity - n + 1)   # the last draft is never fed
            if want[i] < 1:
                continue                 # no room left in the draft cache: propose nothing
            seq = self._seqs.get(inp.req_id)
            if seq is None:
                seq = self._seqs[inp.req_id] = _Seq(self.cache.allocate(), [])
            p = min(_common_prefix(seq.cached, inp.tokens, seq.committed), n - 1)
            del seq.cached[p:]           # rows from p on are overwritten below
            live.append(i)
            chunks.append(Chunk(seq.slot, p, inp.tokens[p:]))
        if not live:
            return out
        drafts: dict[int, list[int]] = {i: [] for i in live}
        rows: dict[int, list[torch.Tensor]] = {i: [] for i in live}
        best, logits = self._run(chunks, [inputs[i] for i in live])
        while True:
            for i, tok, row, conf in zip(live, *self._pick(best, logits, [inputs[i] for i in live])):
                drafts[i].append(tok)
                if row is not None:
                    rows[i].append(row)
                if conf < self.min_confidence:
                    want[i] = len(drafts[i])         # unsure: this draft is the last
            live = [i for i in live if len(drafts[i]) < want[i]]
            if not live:
                break
            # Feed each request's newest draft at the position after the last one cached.
            best, logits = self._run([Chunk(self._seqs[inputs[i].req_id].slot,
                                            len(inputs[i].tokens) + len(drafts[i]) - 1, [drafts[i][-1]])
                                      for i in live], [inputs[i] for i in live])
        for i, d in drafts.items():
            inp = inputs[i]
            seq = self._seqs[inp.req_id]
            seq.cached += inp.tokens[len(seq.cached):] + d[:-1]   # the last draft was never fed
            seq.committed = len(inp.tokens)
            out[i] = Proposal(d, torch.stack(rows[i]) if rows[i] else None)
        return out

    def _pick(self, best: torch.Tensor, logits: torch.Tensor,
              inputs: list[DraftInput]) -> tuple[list[int], list[torch.Tensor | None], list[float]]:
        """best (B,) argmax, logits (the full inputs' rows, V: sampled ones, or
        all with min_confidence) -> one draft token per input, the
        distribution it was drawn from ((V,) float32) for sampled inputs (None
        for greedy ones), and its probability under the drafter (1.0 without
        min_confidence)."""
        toks = best.tolist()                                           # B ids
        probs: list[torch.Tensor | None] = [None] * len(inputs)
        conf = [1.0] * len(inputs)
        judge = self.min_confidence > 0
        drawn: list[tuple[int, torch.Tensor]] = []
        greedy_rows: list[int] = []          # judged greedy inputs; with judge every input has a row, row b
        for b, inp in enumerate(inputs):
            if inp.temperature > 0:
                row = b if judge else len(drawn)                       # else only sampled inputs have rows
                p = probs_from_logits(logits[row:row + 1], inp.temperature, inp.top_k, inp.top_p)
                drawn.append((b, sample(p, inp.generator)))                # (1,)
                probs[b] = p[0]
            elif judge:
                greedy_rows.append(b)
        if drawn:                            # one more host sync, for all sampled rows (and their probabilities)
            picked = torch.cat([t for _, t in drawn])
            got = picked.tolist()
            drawn_p = torch.stack([probs[b][t] for (b, _), t in zip(drawn, got)]).tolist() if judge else None
            for j, ((b, _), t) in enumerate(zip(drawn, got)):
                toks[b] = t
                if judge:
                    conf[b] = drawn_p[j]
        if greedy_rows:                                                # the argmax's softmax probability
            idx = torch.tensor(greedy_rows)
            top = torch.softmax(logits.index_select(0, idx).float(), dim=-1).amax(dim=-1).tolist()
            for b, c in zip(greedy_rows, top):
                conf[b] = c
        return toks, probs, conf


def draft_model_proposer(target_config: ModelConfig, draft_path, device="cpu", dtype="float32",
                         max_seqs: int = 8, max_seq_len: int = 2048, name: str = "draft_model",
                         min_confidence: float = 0.0) -> ModelProposer:
    """A ModelProposer over the draft checkpoint at `draft_path`. Refuses a
    draft whose vocab_size differs from the target's (equal sizes are
    necessary, not sufficient: the tokenizers must be the same too)."""
    ckpt = read_checkpoint(draft_path)       # config only: refuse before loading any weight
    if ckpt.config.vocab_size != target_config.vocab_size:
        raise ValueError(f"draft model {draft_path} has vocab_size {ckpt.config.vocab_size}, the target "
                         f"({target_config.architecture}) has {target_config.vocab_size}: a draft must share "
                         f"the target's vocabulary")
    runner = ModelRunner.from_pretrained(draft_path, device=device, dtype=dtype, max_seqs=max_seqs,
                                         max_seq_len=max_seq_len)
    return ModelProposer(runner, None, max_seqs, max_seq_len, name, min_confidence)


def layer_skip_proposer(target_runner: ModelRunner, layers: int | list[int], max_seqs: int = 8,
                        max_seq_len: int = 2048, name: str = "layer_skip", min_confidence: float = 0.0) -> ModelProposer:
    """Self-speculation: the target's layers `layers` (an int L' means the
    first L'; a list is an explicit sorted subset), then its final norm and LM
    head, over a KV cache of those layers only."""
    N = target_runner.config.num_layers
    if isinstance(layers, int):
        if not 1 <= layers < N:
            raise ValueError(f"layer skip: {layers} layers requested, expected 1..{N - 1} "
                             f"(the target has {N})")
        layers = list(range(layers))
    return ModelProposer(target_runner, layers, max_seqs, max_seq_len, name, min_confidence)
