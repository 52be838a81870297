"""Loading checkpoints: sharded layouts, and clear errors for broken ones."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from specmoe import Engine
from specmoe.experts.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                        num_experts_per_tok=2, initializer_range=0.2)
    d = tmp_path_factory.mktemp("mixtral")
    MixtralForCausalLM(cfg).save_pretrained(d)
    return d


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(d, fn):
    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def test_sharded_checkpoint_with_index_loads_identically(mixtral_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    ids = list(range(3, 40))
    torch.testing.assert_close(Engine.from_pretrained(sharded).logits(ids),
                               Engine.from_pretrained(mixtral_dir).logits(ids), atol=0, rtol=0)


def test_missing_tensor_is_named(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    _edit_tensors(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing tensor {name}.*expected shape \(32, 48\)"):
        Engine.from_pretrained(d)


def test_transposed_tensor_names_shapes(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    _edit_tensors(d, lambda t: t.__setitem__(name, t[name].t().contiguous()))
    with pytest.raises(CheckpointError, match=rf"tensor {name}: shape \(32, 48\), expected \(48, 32\)"):
        Engine.from_pretrained(d)


def test_unknown_model_type_lists_supported(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt_oss", architectures=["GptOssForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['GptOssForCausalLM'\].*'gpt_oss'.*"
                                              r"supported: .*MixtralForCausalLM"):
        Engine.from_pretrained(d)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("hidden_size"), r"MixtralForCausalLM: config.json has no 'hidden_size'"),
    (lambda c: c.__setitem__("num_experts_per_tok", 9), r"experts per token 9 must be in 1..4"),
    (lambda c: c.__setitem__("num_key_value_heads", 3), r"num_attention_heads 4 is not a multiple"),
    (lambda c: c.__setitem__("hidden_size", "wide"), r"'hidden_size' = 'wide' is not a valid int"),
    (lambda c: c.__setitem__("hidden_act", "gelu"), r"hidden_act 'gelu' is not supported"),
    (lambda c: c.__setitem__("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}),
     r"rope scaling type 'longrope' is not supported"),
])
def test_malformed_config_is_explained(mixtral_dir, tmp_path, edit, message):
    d = _copy(mixtral_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        Engine.from_pretrained(d)


def test_unparseable_config_and_missing_files(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        Engine.from_pretrained(d)
    with pytest.raises(CheckpointError, match=r"does not exist"):
        Engine.from_pretrained(tmp_path / "nowhere")
    d2 = _copy(mixtral_dir, tmp_path / "b")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files"):
        Engine.from_pretrained(d2)


def test_missing_shard_listed_in_index_is_named(mixtral_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(mixtral_dir).save_pretrained(sharded, max_shard_size="20KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard {victim.name}, which is missing"):
        Engine.from_pretrained(sharded)


def test_bad_requests_fail_clearly_and_engine_keeps_working(mixtral_dir):
    from specmoe import SamplingParams
    eng = Engine.from_pretrained(mixtral_dir, max_batch=2, max_seq_len=64)
    with pytest.raises(ValueError, match=r"token id 64 outside the vocabulary 0..63"):
        eng.generate([[1, 2, 64]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"string prompts need a tokenizer.json"):
        eng.generate(["hello"])
    with pytest.raises(ValueError, match=r"exceed max_seq_len 64"):
        eng.generate([[1] * 60], SamplingParams(max_tokens=8))
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"empty prompt"):
        eng.generate([[]])
    # Nothing leaked: all slots are free again and generation still works for a full batch.
    assert eng.runner.cache.free_slots == 2
    out = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [4, 4]
    assert all(o.stats.steps == 4 and o.stats.draft_tokens == 0 for o in out)


def test_state_dict_names_are_the_weight_spec_names(mixtral_dir):
    """Each parameter is registered once (no aliased modules), so a state_dict
    round-trips and its names are those the family specs load."""
    from specmoe.experts.families import mixtral
    model = Engine.from_pretrained(mixtral_dir).runner.model
    names = set(model.state_dict())
    assert names == set(mixtral.weight_specs(model.config))
