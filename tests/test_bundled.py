"""The bundled tiny models (experts/bundled/, written by scripts/train_tiny.py):
a trained Mixtral-style MoE target and a dense Llama draft with one shared
tokenizer. They load in transformers and in specmoe with the same numbers,
they are actually trained, and the draft speculates for the target."""

import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

from specmoe import Engine, SamplingParams


def _bundled_dir() -> Path:
    if os.environ.get("SPECMOE_BUNDLED"):   # another copy, e.g. a fresh training run's --out
        return Path(os.environ["SPECMOE_BUNDLED"])
    try:   # the installed package's copy (package data), else the source tree's
        import specmoe.experts
        d = Path(specmoe.experts.__file__).resolve().parent / "bundled"
        if (d / "tiny-moe").exists():
            return d
    except ImportError:
        pass
    return Path(__file__).resolve().parents[1] / "experts" / "bundled"


BUNDLED = _bundled_dir()
MOE, DRAFT = BUNDLED / "tiny-moe", BUNDLED / "tiny-draft"

pytestmark = pytest.mark.skipif(
    not (MOE / "config.json").exists() or not (DRAFT / "config.json").exists(),
    reason=f"bundled models not found under {BUNDLED}: train them with "
           "`python scripts/train_tiny.py --out experts/bundled --minutes 25`",
)

# Not from the training corpus: code in the style of the standard library.
SNIPPET = '''\
import os
import sys


def read_config(path, default=None):
    """Return the lines of the file at path, or default if it does not exist."""
    if not os.path.exists(path):
        return default
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\\n") for line in f]
    result = {}
    for line in lines:
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        result[key.strip()] = value.strip()
    return result


class Counter:
    def __init__(self, name):
        self.name = name
        self.count = 0

    def increment(self, n=1):
        self.count += n
        return self.count

    def __repr__(self):
        return f"{self.__class__.__name__}({self.name!r}, count={self.count})"


if __name__ == "__main__":
    print(read_config(sys.argv[1]))
'''

PROMPTS = ["def main():\n", "class Parser:\n    def __init__(self, text):\n"]


@pytest.fixture(scope="module")
def hf_moe():
    from transformers import AutoModelForCausalLM, MixtralForCausalLM
    m = AutoModelForCausalLM.from_pretrained(MOE, dtype=torch.float32).eval()
    assert isinstance(m, MixtralForCausalLM)
    return m


@pytest.fixture(scope="module")
def hf_draft():
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    m = AutoModelForCausalLM.from_pretrained(DRAFT, dtype=torch.float32).eval()
    assert isinstance(m, LlamaForCausalLM)
    return m


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(MOE, dtype="float32")


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(MOE / "tokenizer.json"))


def test_tokenizer_is_shared_and_round_trips(tok):
    assert (MOE / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()
    ids = tok.encode(SNIPPET).ids
    assert tok.decode(ids) == SNIPPET
    assert len(ids) < len(SNIPPET) / 2, "BPE should merge common Python substrings"
    eos = tok.token_to_id("<|endoftext|>")
    assert eos is not None
    for d in (MOE, DRAFT):
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == eos
        assert json.loads((d / "config.json").read_text())["vocab_size"] == tok.get_vocab_size()


def test_specmoe_logits_match_transformers(engine, hf_moe, hf_draft, tok):
    ids = tok.encode(SNIPPET).ids[:160]
    with torch.no_grad():
        ref = hf_moe(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(engine.logits(ids), ref, atol=1e-3, rtol=1e-3)
    draft = Engine.from_pretrained(DRAFT, dtype="float32")
    with torch.no_grad():
        ref = hf_draft(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(draft.logits(ids), ref, atol=1e-3, rtol=1e-3)


def test_target_is_trained(hf_moe, tok):
    ids = torch.tensor([tok.encode(SNIPPET).ids])
    with torch.no_grad():
        logits = hf_moe(ids).logits[0, :-1]
    loss = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    bound = 0.6 * math.log(tok.get_vocab_size())
    print(f"target next-token loss on the snippet: {loss:.3f} (log V = {math.log(tok.get_vocab_size()):.3f})")
    assert loss < bound, f"loss {loss:.3f} >= {bound:.3f}: the bundled target looks untrained"


def _strip_eos(ids, eos):
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_generation_matches_transformers(engine, hf_moe, tok):
    eos = tok.token_to_id("<|endoftext|>")
    out = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=16))[0]
    prompt = tok.encode(PROMPTS[0]).ids
    with torch.no_grad():
        ref = hf_moe.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                              pad_token_id=eos)[0, len(prompt):].tolist()
    assert _strip_eos(out.token_ids, eos) == _strip_eos(ref, eos)
    assert out.text == tok.decode(out.token_ids)
    print(f"greedy continuation of {PROMPTS[0]!r}: {out.text!r}")


def test_draft_model_speculation_is_exact_and_accepted(engine):
    params = SamplingParams(max_tokens=32)
    spec = Engine.from_pretrained(MOE, dtype="float32",
                                  speculation={"method": "draft_model", "k": 4, "draft_model": str(DRAFT)})
    t0 = time.perf_counter()
    base = engine.generate(PROMPTS, params)
    t1 = time.perf_counter()
    got = spec.generate(PROMPTS, params)
    t2 = time.perf_counter()
    for b, g in zip(base, got):
        assert g.token_ids == b.token_ids
    drafted = sum(g.stats.draft_tokens for g in got)
    accepted = sum(g.stats.accepted_tokens for g in got)
    rate = accepted / drafted if drafted else 0.0
    print(f"draft-model speculation (k=4): acceptance {accepted}/{drafted} = {rate:.2f}, "
          f"target steps {sum(g.stats.steps for g in got)} vs {sum(b.stats.steps for b in base)} without; "
          f"{t2 - t1:.2f}s vs {t1 - t0:.2f}s")
    assert drafted > 0
    assert rate > 0.2, f"acceptance rate {rate:.2f}: the draft does not predict the target"


def test_engine_without_a_path_loads_the_bundled_moe():
    from specmoe.experts.checkpoint import BUNDLED
    if not (BUNDLED / "tiny-moe" / "config.json").exists():
        pytest.skip("no bundled model in this tree")
    eng = Engine.from_pretrained(max_batch=1, max_seq_len=64)
    assert eng.config.architecture == "MixtralForCausalLM" and eng.tokenizer is not None
    assert eng.generate(["import os\n"], SamplingParams(max_tokens=4))[0].text is not None
