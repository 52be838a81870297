"""Text in and out: the tiny checkpoint the demo builds (with a tokenizer),
string prompts, stop strings, streamed text deltas and the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from specmoe import Engine, SamplingParams
from specmoe.cluster.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, str(ROOT / "scripts/make_tiny_checkpoint.py"), str(d), "--layers", "2",
                    "--hidden", "64", "--experts", "4", "--ffn", "64"], check=True, capture_output=True)
    return d


def test_stop_strings_cut_the_text_and_stream_deltas_add_up(tiny):
    eng = Engine.from_pretrained(tiny, max_batch=4, max_seq_len=256, speculation={"method": "ngram", "k": 3})
    plain = eng.generate(["Speculative decoding"], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    assert plain.text and len(plain.text) > 12
    stop = plain.text[8:11]
    cut = plain.text.index(stop)
    out = eng.generate(["Speculative decoding"], SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == plain.text[:cut]
    assert out.token_ids == plain.token_ids[:len(out.token_ids)] and len(out.token_ids) < 40
    streamed = "".join(c.text for c in eng.generate_stream(
        ["Speculative decoding", "Mixture-of-Experts models route"],
        SamplingParams(max_tokens=40, ignore_eos=True, stop=(stop,))) if c.index == 0)
    assert streamed == out.text
    with pytest.raises(ValueError, match="stop strings must be non-empty"):
        SamplingParams(stop=("",))


def test_cli_generate_and_errors(tiny, capsys):
    assert main(["generate", "--model", str(tiny), "--prompt", "The quick", "--max-tokens", "8",
                 "--speculation", "ngram", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "8 tokens" in out and "drafts accepted" in out and "speculation ngram" in out
    assert main(["generate", "--model", str(tiny / "missing"), "--prompt", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_generate_few_row_linears_reaches_the_embedded_engine(tiny, capsys, monkeypatch):
    from specmoe.kernels import linear as few_rows
    monkeypatch.setattr(few_rows, "SMALL_ROWS", few_rows.SMALL_ROWS)        # a setting of the process
    assert main(["generate", "--model", str(tiny), "--prompt", "The quick", "--max-tokens", "4",
                 "--few-row-linears", "0"]) == 0
    assert "4 tokens" in capsys.readouterr().out and few_rows.SMALL_ROWS == 0 and few_rows.copies() == (0, 0)
    assert main(["generate", "--model", str(tiny), "--prompt", "x", "--few-row-linears", "-1"]) == 2
    assert "few_row_linears must be an integer >= 0" in capsys.readouterr().err


def test_streamed_text_never_shows_a_stop_string_split_over_tokens(tiny):
    eng = Engine.from_pretrained(tiny, max_batch=2, max_seq_len=256)
    plain = eng.generate(["The quick"], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    # A stop string whose first occurrence spans a token boundary: 2 characters before it, 1 after.
    text = plain.text
    bounds = [len(eng.tokenizer.decode(plain.token_ids[:i])) for i in range(1, 41)]
    b = next(b for b in bounds if 2 <= b < len(text) and "\ufffd" not in text[b - 2:b + 1]
             and text.index(text[b - 2:b + 1]) == b - 2)
    stop = text[b - 2:b + 1]
    want = plain.text[:plain.text.index(stop)]
    chunks = [c.text for c in eng.generate_stream(["The quick"], SamplingParams(max_tokens=40, ignore_eos=True,
                                                                               stop=(stop,)))]
    assert "".join(chunks) == want
    assert all(stop not in "".join(chunks[:j + 1]) for j in range(len(chunks)))
