"""Serving configuration: YAML and TOML into one frozen msgspec tree, flags
override it, unknown keys and bad values are errors naming the key."""

import msgspec
import pytest

from specmoe.cluster.cli import main
from specmoe.cluster.config import ConfigError, ServeConfig, load_config
from specmoe.kernels.linear import DEFAULT_ROWS


def test_defaults_bind_loopback_and_speculate_auto():
    cfg = load_config()
    assert cfg.server.host == "127.0.0.1" and cfg.server.token is None and cfg.server.tls_cert is None
    assert cfg.engine.model is None and cfg.engine.speculation == "auto" and cfg.engine.ep == 1
    assert cfg.engine.few_row_linears == DEFAULT_ROWS
    with pytest.raises(AttributeError):
        cfg.server.port = 1   # frozen


def test_yaml_and_toml_give_the_same_tree(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("server:\n  port: 6000\n  token: s3cret\nengine:\n  max_batch: 4\n  speculation: {method: ngram, k: 2}\n"
                 "ray:\n  address: auto\n")
    t = tmp_path / "c.toml"
    t.write_text('[server]\nport = 6000\ntoken = "s3cret"\n[engine]\nmax_batch = 4\n'
                 '[engine.speculation]\nmethod = "ngram"\nk = 2\n[ray]\naddress = "auto"\n')
    a, b = load_config(y), load_config(t)
    assert a == b
    assert a.server.port == 6000 and a.engine.max_batch == 4 and a.engine.speculation == {"method": "ngram", "k": 2}
    assert msgspec.json.decode(msgspec.json.encode(a), type=ServeConfig) == a   # what the router actor receives


def test_flags_override_the_file_and_none_leaves_it(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("server:\n  port: 6000\n  host: 0.0.0.0\n")
    cfg = load_config(y, {"server.port": 7000, "server.host": None, "engine.ep": 2})
    assert cfg.server.port == 7000 and cfg.server.host == "0.0.0.0" and cfg.engine.ep == 2


@pytest.mark.parametrize("text, key", [
    ("server:\n  prot: 1\n", "server.prot"),
    ("engine:\n  max_batchh: 1\n", "engine.max_batchh"),
    ("serverr:\n  port: 1\n", "serverr"),
])
def test_unknown_key_is_an_error_naming_it(tmp_path, text, key):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(y)


@pytest.mark.parametrize("text, words", [
    ("server:\n  port: 70000\n", "server.port"),
    ("server:\n  tls_cert: a.pem\n", "tls_key"),
    ("engine:\n  speculation: magic\n", "engine.speculation"),
    ("engine:\n  ep: 0\n", "engine.ep"),
    ("server:\n  port: eighty\n", "port"),
    ("engine:\n  few_row_linears: -1\n", r"engine.few_row_linears must be an integer >= 0 .*got -1"),
    ("engine:\n  few_row_linears: three\n", r"Expected `int`, got `str` - at `\$.engine.few_row_linears`"),
    ("engine:\n  few_row_linears: 1.5\n", r"Expected `int`, got `float` - at `\$.engine.few_row_linears`"),
])
def test_bad_values_name_the_key(tmp_path, text, words):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_config(y)


def test_serve_cli_refuses_a_bad_config_before_starting_anything(tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text("server:\n  prot: 1\n")
    assert main(["serve", "--config", str(y)]) == 2
    assert "unknown key 'server.prot'" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--few-row-linears", "-2"]) == 2
    assert "engine.few_row_linears must be an integer >= 0" in capsys.readouterr().err


def test_bench_summary_takes_medians_per_configuration():
    from specmoe.cluster.bench import summarize
    base = dict(target="t", max_tokens=8, requests=2, generated_tokens=16, draft_tokens=4, accepted_tokens=2,
                errors=[], ttft_p50_s=0.1, ttft_p99_s=0.2, tpot_p50_s=0.01, tpot_p99_s=0.02, acceptance=0.5,
                mean_k=1.0, tokens_per_step=1.5, wall_s=1.0)
    runs = [dict(base, concurrency=c, speculation=s, tokens_per_s=v)
            for c, s, v in [(1, "auto", 10.0), (1, "off", 7.0), (1, "auto", 30.0), (1, "off", 9.0),
                            (1, "auto", 20.0), (1, "off", 8.0)]]
    rows = summarize(runs)
    assert [(r["speculation"], r["tokens_per_s"], r["runs"], r["requests"]) for r in rows] == [
        ("auto", 20.0, 3, 6), ("off", 8.0, 3, 6)]


def test_a_missing_ep_runner_is_a_clear_error(monkeypatch):
    """Until (or wherever) the EP runner cannot be imported, --ep N > 1 says so."""
    from specmoe.cluster.config import EngineConfig
    from specmoe.cluster.router_actor import build_engine
    from specmoe.router.engine import Engine

    def no_ep(*args, **kw):
        raise ImportError("No module named 'specmoe.experts.ep_runner'")
    monkeypatch.setattr(Engine, "from_pretrained", no_ep)
    with pytest.raises(RuntimeError, match=r"engine.ep=2: expert parallelism is not available .*--ep 1"):
        build_engine(EngineConfig(ep=2))
    with pytest.raises(ImportError):   # with ep 1 an ImportError is some other fault: not relabelled
        build_engine(EngineConfig(ep=1))


@pytest.fixture
def keep_few_rows(monkeypatch):
    """kernels.linear.SMALL_ROWS is a setting of the process: put it back after the test."""
    from specmoe.kernels import linear as few_rows
    monkeypatch.setattr(few_rows, "SMALL_ROWS", few_rows.SMALL_ROWS)
    return few_rows


@pytest.mark.parametrize("rows", [0, 3])
def test_engine_few_row_linears_decides_whether_decode_makes_transposed_copies(rows, keep_few_rows, tmp_path):
    """engine.few_row_linears from a config file reaches the forward (config ->
    build_engine -> Engine.from_pretrained -> the runner): 0 makes no copy of
    any weight in batch-1 decode steps of one row; the default copies the
    model's dense weights."""
    from specmoe.cluster.router_actor import build_engine
    from specmoe.router.engine import SamplingParams
    few_rows = keep_few_rows
    few_rows.set_small_rows(0)                      # start with no copies of anything
    few_rows.SMALL_ROWS = 3 - rows                  # and the other setting, which the engine must replace
    y = tmp_path / "c.yaml"
    y.write_text(f"engine:\n  max_batch: 1\n  max_seq_len: 64\n  speculation: 'off'\n  few_row_linears: {rows}\n")
    eng = build_engine(load_config(y).engine)
    out = eng.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and few_rows.SMALL_ROWS == rows
    weights = {id(p) for p in eng.runner.model.parameters()}
    copied = weights & {k for k, _ in few_rows._copies}
    if rows == 0:
        assert few_rows.copies() == (0, 0)
    else:
        assert id(eng.runner.model.lm_head) in copied and len(copied) >= 3   # the LM head and attention


def test_engine_from_pretrained_refuses_a_bad_few_row_linears_before_loading(keep_few_rows):
    from specmoe.router.engine import Engine
    for bad in (-1, "3", 1.0):
        with pytest.raises(ValueError, match=f"few_row_linears must be an integer >= 0 .*got {bad!r}"):
            Engine.from_pretrained(few_row_linears=bad)
        with pytest.raises(ValueError, match="few_row_linears must be an integer >= 0"):
            Engine.from_pretrained(ep=2, few_row_linears=bad)          # before any Ray worker starts


def test_a_draft_model_load_keeps_the_engines_few_row_linears(keep_few_rows, tiny_mixtral, tiny_llama_draft):
    """The draft model is loaded after the target (drafter/model_proposer.py, ModelRunner.from_pretrained with
    no few_row_linears): that load leaves the engine's setting of the process as it is, 0 stays 0."""
    from specmoe.router.engine import Engine
    few_rows = keep_few_rows
    eng = Engine.from_pretrained(tiny_mixtral, max_batch=1, max_seq_len=64, few_row_linears=0,
                                 speculation={"method": "draft_model", "k": 2, "draft_model": str(tiny_llama_draft)})
    assert eng is not None and few_rows.SMALL_ROWS == 0
