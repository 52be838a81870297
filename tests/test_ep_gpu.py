"""Expert parallelism over NCCL: EP workers on CUDA give the single-process
CUDA logits and greedy text. Marked `gpu`; skipped where CUDA is absent, and
the EP=2 cases where fewer than two GPUs are visible (one GPU per worker).
Never run on the CPU-only development machines: untested there."""

import pytest
import torch

from specmoe import Engine, SamplingParams
from specmoe.experts.batch import Chunk
from specmoe.experts.runner import ModelRunner

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

PROMPTS = [list(range(5, 17)), [9, 9, 9, 9, 9, 9], [40, 41, 42, 43, 40, 41, 42]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ep_gpu_target")
    MixtralForCausalLM(MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, initializer_range=0.2,
        eos_token_id=None)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ray_gpus():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    yield torch.cuda.device_count()
    ray.shutdown()


@pytest.mark.parametrize("ep", [1, 2])
def test_nccl_ep_logits_and_greedy_match_single_process_cuda(ep, ray_gpus, target):
    from specmoe.experts.ep_runner import EPRunner
    if ray_gpus < ep:
        pytest.skip(f"EP={ep} needs {ep} GPUs, {ray_gpus} visible")
    ref = ModelRunner.from_pretrained(target, device="cuda", max_seqs=4, max_seq_len=64)
    runner = EPRunner.from_pretrained(target, ep=ep, device="cuda", max_seqs=4, max_seq_len=64)
    try:
        assert all(i["backend"] == "nccl" for i in runner.worker_info)
        chunks = [Chunk(0, 0, PROMPTS[0]), Chunk(3, 0, PROMPTS[1])]
        want = ref.run(chunks, all_logits=True, routing=True)
        got = runner.run(chunks, all_logits=True, routing=True)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(got.routing.tokens_per_expert, want.routing.tokens_per_expert)
        p = SamplingParams(max_tokens=16, ignore_eos=True)
        plain = [o.token_ids for o in Engine(ModelRunner.from_pretrained(target, device="cuda", max_seqs=4,
                                                                         max_seq_len=64)).generate(PROMPTS, p)]
        for spec in ("off", {"method": "ngram", "k": 3}, {"method": "layer_skip", "k": 2, "layers": 1}):
            assert [o.token_ids for o in Engine(runner, speculation=spec).generate(PROMPTS, p)] == plain, spec
    finally:
        runner.close()
