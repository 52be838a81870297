"""Fixtures for the family tests: tiny random checkpoints written by
transformers' own classes, built once per session, and the transformers
reference they were saved from.

Every family variant is described by a `FamilySpec`; `family` is a session
fixture parametrized over all of them (ids are the variant names), and
`checkpoints` builds any variant by name for tests that want only a few.
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))      # tests/_helpers.py


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """A 4-layer, 8-expert top-2 Mixtral over a 128-token vocabulary (no EOS):
    the speculation and expert-parallel tests' target."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny_mixtral")
    MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, initializer_range=0.2,
        eos_token_id=None, bos_token_id=0)).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_llama_draft(tmp_path_factory):
    """A 2-layer Llama with tiny_mixtral's vocabulary: their draft model."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(1)
    d = tmp_path_factory.mktemp("tiny_llama_draft")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                                 eos_token_id=None)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and spinning OpenMP
    workers slow the suite down several times on a busy 2-core machine.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

VOCAB = 128
EOS = VOCAB - 1          # saved as eos_token_id in config.json and generation_config.json
BOS = 0


@dataclass(frozen=True)
class FamilySpec:
    id: str                  # test id, e.g. "deepseek_v3-yarn"
    config_cls: str          # transformers class names
    model_cls: str
    kwargs: dict             # config arguments on top of the common tiny ones
    family: str              # expected specmoe ModelConfig.family
    moe: bool = False


def _common(hidden=32, layers=2, heads=4, kv_heads=2, inter=64):
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=inter, max_position_embeddings=256,
                initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=None,
                rms_norm_eps=1e-6)


_DSV3 = dict(_common(hidden=48, layers=3, heads=4, kv_heads=4, inter=64), q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=24, n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1,
             routed_scaling_factor=2.5, norm_topk_prob=True)
_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
         "mscale_all_dim": 1.0, "rope_theta": 10000.0, "beta_fast": 32, "beta_slow": 1}
_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64, "rope_theta": 10000.0}

FAMILIES: list[FamilySpec] = [
    FamilySpec("mixtral", "MixtralConfig", "MixtralForCausalLM",
               dict(_common(), num_local_experts=8, num_experts_per_tok=2, intermediate_size=48), "mixtral", True),
    FamilySpec("mixtral-sliding_window", "MixtralConfig", "MixtralForCausalLM",
               dict(_common(), num_local_experts=8, num_experts_per_tok=2, intermediate_size=48, sliding_window=16),
               "mixtral", True),
    FamilySpec("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
               dict(_common(), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                    shared_expert_intermediate_size=40, norm_topk_prob=False), "qwen2_moe", True),
    FamilySpec("qwen2_moe-dense0-normtopk", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
               dict(_common(layers=3), num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                    shared_expert_intermediate_size=40, norm_topk_prob=True, mlp_only_layers=[0]),
               "qwen2_moe", True),
    FamilySpec("qwen2_moe-sparse_step2", "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
               dict(_common(layers=3), num_experts=8, num_experts_per_tok=3, moe_intermediate_size=24,
                    shared_expert_intermediate_size=40, decoder_sparse_step=2), "qwen2_moe", True),
    FamilySpec("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
               dict(_common(), head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24,
                    norm_topk_prob=True), "qwen3_moe", True),
    FamilySpec("olmoe", "OlmoeConfig", "OlmoeForCausalLM",
               dict(_common(), num_experts=8, num_experts_per_tok=2, intermediate_size=24), "olmoe", True),
    FamilySpec("olmoe-clip_qkv", "OlmoeConfig", "OlmoeForCausalLM",
               dict(_common(), num_experts=8, num_experts_per_tok=2, intermediate_size=24, clip_qkv=0.5),
               "olmoe", True),
    FamilySpec("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", dict(_DSV3), "deepseek_v3", True),
    FamilySpec("deepseek_v3-yarn", "DeepseekV3Config", "DeepseekV3ForCausalLM",
               dict(_DSV3, rope_parameters=dict(_YARN), max_position_embeddings=256), "deepseek_v3", True),
    FamilySpec("deepseek_v3-full_rank_q", "DeepseekV3Config", "DeepseekV3ForCausalLM",
               dict(_DSV3, q_lora_rank=None), "deepseek_v3", True),
    FamilySpec("deepseek_v3-no_interleave-no_norm_topk", "DeepseekV3Config", "DeepseekV3ForCausalLM",
               dict(_DSV3, rope_interleave=False, norm_topk_prob=False), "deepseek_v3", True),
    FamilySpec("llama", "LlamaConfig", "LlamaForCausalLM", dict(_common()), "llama"),
    FamilySpec("llama-bias-rope_linear", "LlamaConfig", "LlamaForCausalLM",
               dict(_common(), attention_bias=True, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                     "rope_theta": 10000.0}), "llama"),
    FamilySpec("llama-rope_llama3", "LlamaConfig", "LlamaForCausalLM",
               dict(_common(), rope_parameters=dict(_LLAMA3)), "llama"),
    FamilySpec("qwen2", "Qwen2Config", "Qwen2ForCausalLM", dict(_common()), "qwen2"),
    FamilySpec("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(_common(), head_dim=16), "qwen3"),
    FamilySpec("qwen3-tied", "Qwen3Config", "Qwen3ForCausalLM",
               dict(_common(), head_dim=16, tie_word_embeddings=True), "qwen3"),
]
BY_ID = {f.id: f for f in FAMILIES}


@dataclass
class Built:
    """One saved checkpoint and the transformers model it was saved from."""
    spec: FamilySpec
    path: Path
    hf: torch.nn.Module                 # float32, eval mode
    _ref: dict = field(default_factory=dict)

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the decoder layers whose HF mlp is a routed MoE block."""
        return [i for i, layer in enumerate(self.hf.model.layers) if hasattr(layer.mlp, "gate")
                and hasattr(layer.mlp, "experts")]

    @torch.no_grad()
    def ref_logits(self, ids: list[int]) -> torch.Tensor:
        """transformers' full-sequence logits (len, V) float32, cached."""
        key = tuple(ids)
        if key not in self._ref:
            self._ref[key] = self.hf(torch.tensor([ids])).logits[0].float()
        return self._ref[key]

    @torch.no_grad()
    def ref_routing(self, ids: list[int]) -> dict[int, torch.Tensor]:
        """layer -> (E,) tokens per expert chosen by transformers' router for `ids`."""
        counts, hooks = {}, []
        for i in self.moe_layers:
            gate = self.hf.model.layers[i].mlp.gate
            E = self.hf.model.layers[i].mlp.experts.num_experts

            def hook(mod, args, out, i=i, E=E):
                counts[i] = torch.bincount(out[-1].reshape(-1), minlength=E)
            hooks.append(gate.register_forward_hook(hook))
        try:
            self.hf(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        return counts

    @torch.no_grad()
    def ref_generate(self, prompt: list[int], max_new_tokens: int, **kw) -> list[int]:
        x = torch.tensor([prompt])
        out = self.hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                               max_new_tokens=max_new_tokens, **kw)
        return out[0, len(prompt):].tolist()


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Make the 1-D tensors transformers initialises to constants informative:
    norm weights (ones) become 1 + noise, biases (zeros) become noise, and the
    DeepSeek correction bias becomes random normal, so that a swapped or
    skipped vector in the loader changes the logits."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            if name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.ndim == 1 and ("norm" in name or "layernorm" in name):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1 and name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def build(spec: FamilySpec, root: Path, seed: int = 0) -> Built:
    import transformers
    torch.manual_seed(seed)
    cfg = getattr(transformers, spec.config_cls)(**spec.kwargs)
    model = getattr(transformers, spec.model_cls)(cfg).float().eval()
    _randomize(model, torch.Generator().manual_seed(seed + 1))
    path = root / spec.id
    model.save_pretrained(path)
    # Reload through transformers so the reference is exactly what the files hold.
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Built(spec=spec, path=path, hf=hf)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> Built, each checkpoint saved once per session."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[str, Built] = {}

    def get(name: str) -> Built:
        if name not in cache:
            cache[name] = build(BY_ID[name], root)
        return cache[name]
    return get


@pytest.fixture(scope="session", params=[f.id for f in FAMILIES])
def family(request, checkpoints) -> Built:
    """Every family variant."""
    return checkpoints(request.param)


@pytest.fixture(scope="session", params=[f.id for f in FAMILIES if f.moe])
def moe_family(request, checkpoints) -> Built:
    """The MoE family variants only."""
    return checkpoints(request.param)


@pytest.fixture
def load_engine():
    """Load a fresh specmoe Engine (its own KV cache) from a Built checkpoint."""
    from specmoe import Engine

    def load(built: Built, dtype: str = "float32", max_batch: int = 8, max_seq_len: int = 256, path=None):
        return Engine.from_pretrained(path or built.path, device="cpu", dtype=dtype, max_batch=max_batch,
                                      max_seq_len=max_seq_len)
    return load


@pytest.fixture
def checkpoint_copy(tmp_path):
    """Copy a checkpoint directory into tmp_path and edit its JSON files."""
    def copy(src: Path, **json_edits) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        for fname, edits in json_edits.items():
            f = dst / f"{fname}.json"
            data = json.loads(f.read_text())
            data.update(edits)
            f.write_text(json.dumps(data))
        return dst
    return copy
