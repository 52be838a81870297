"""Expert parallelism on a real Ray runtime, gloo on CPU: EP = 1, 2, 4 give
the single-process logits (atol 1e-5, float32) and greedy text with and
without speculation, including steps where a rank holds no sequence; workers
spread over two Ray nodes (ray.cluster_utils.Cluster, custom resources) give
the same output; a killed worker is detected within 5 s and nothing hangs.

One two-node Ray cluster serves the whole module (Ray start-up costs seconds)
and is always shut down."""

import threading
import time

import pytest
import torch

from specmoe import Engine, SamplingParams
from specmoe.experts.batch import Chunk
from specmoe.experts.placement import Placement, balanced, contiguous
from specmoe.experts.runner import ModelRunner
from specmoe.kernels.sampling import probs_from_logits
from specmoe.kernels.verify import SampleSpec, verify_sampling_u

from _helpers import assert_same_or_near_tie  # noqa: E402  (tests/, on sys.path via conftest)

V = 128
PROMPTS = [[5, 9, 17, 5, 9, 17, 5, 9], [40, 41, 42, 43, 40, 41, 42, 43, 40, 41, 3], [7, 7, 7, 7],
           [100, 3, 100, 4, 100, 5, 100, 3, 100], [11, 22, 33, 44, 55, 66, 77, 88, 99, 11, 22, 33]]
MAX_TOKENS = 24

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- placement (no Ray) -------------------------------------------------------------------------------------

def test_contiguous_placement_splits_uneven_counts_and_refuses_too_many_ranks():
    p = contiguous(10, 4)
    assert [p.experts_of(r) for r in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    assert p.local_index() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 1]
    assert "rank 2: experts 6-7" in p.describe()
    with pytest.raises(ValueError, match="at least as many experts"):
        contiguous(2, 4)
    with pytest.raises(ValueError, match="rank 1 holds no expert"):
        Placement(2, [0, 0, 0])


def test_balanced_placement_evens_out_measured_load():
    load = [100, 90, 80, 70, 4, 3, 2, 1]              # contiguous over 2 ranks: 340 vs 10
    p = balanced(load, 2)
    per_rank = [sum(load[e] for e in p.experts_of(r)) for r in range(2)]
    assert max(per_rank) - min(per_rank) <= 20, per_rank
    assert sorted(len(p.experts_of(r)) for r in range(2)) == [4, 4]
    with pytest.raises(ValueError, match="non-negative"):
        balanced([1, -1], 2)


# ---- the socket control plane (no Ray) ------------------------------------------------------------------------

SPANS = [[(1, 1)], [(0, 1), (2, 1)]]      # rank 0's row goes to row 1, rank 1's to rows 0 and 2


def _channel_pair(shm_bytes=None):
    """A router channel and two "workers" serving on threads (rank 0 over the
    Unix socket with a shared rows region of shm_bytes (None: the default),
    rank 1 over TCP): rank r answers a plan with (plan + its rank, r + 1 rows
    of value r + column + 10 row), rank 1 raises on b"boom"; a stranger
    without the token connects first and is refused."""
    import socket

    from specmoe.experts import ep_channel as ch
    router = ch.RouterChannel("127.0.0.1", 2)
    stranger = socket.create_connection(router.address[:2])
    stranger.sendall(b"x" * 20)

    def step_of(rank):
        def step(plan):
            if bytes(plan) == b"boom" and rank == 1:
                raise ValueError("bad plan")
            rows = rank + torch.arange(3.0) + 10 * torch.arange(rank + 1.0)[:, None]
            return bytes(plan) + bytes([rank]), rows.numpy()
        return step
    kw = {} if shm_bytes is None else {"shm_bytes": shm_bytes}
    links = {r: ch.connect(router.address, router.token, r, 5.0, same_node=r == 0, **kw) for r in (1, 0)}
    assert links[0][0].family == socket.AF_UNIX and links[1][0].family == socket.AF_INET
    assert links[1][1] is None and (links[0][1] is None) == (shm_bytes == 0)
    for r, (sock, region) in links.items():
        ch.start_thread(sock, step_of(r), r, region)
    router.accept(5.0)
    stranger.close()
    return router, {r: sock for r, (sock, _) in links.items()}


@pytest.mark.parametrize("shm_bytes", [None, 8, 0], ids=["shared", "too-small", "no-region"])
def test_control_channel_frames_logits_into_place_and_reports_failures(shm_bytes):
    """Rows land in their places in the router's tensor (rank 1's rows around
    rank 0's), rank 0's through its shared region where they fit (12 bytes do
    not fit in 8: inline) and inline over TCP for rank 1; a step that raises
    comes back as that rank's failure, a closed connection as its death."""
    import socket

    from specmoe.experts import ep_channel as ch
    from specmoe.experts.ep_channel import ChannelError
    router, _ = _channel_pair(shm_bytes)
    assert (router.shared[0] is not None) == (shm_bytes != 0) and router.shared[1] is None
    sent = {}
    real_send = ch._send

    def spy(sock, buffers):          # which status each worker's frame carried
        sent.setdefault(sock.family, []).append(ch._RESULT.unpack(bytes(buffers[0]))[2])
        real_send(sock, buffers)
    ch._send = spy
    try:
        for _ in range(2):
            router.broadcast(b"go")
            logits = torch.empty(3, 3)
            got = router.gather(logits, SPANS, 5.0, 0.05, lambda: None)
            assert [bytes(m) for m in got] == [b"go\x00", b"go\x01"]
            assert torch.equal(logits, torch.tensor([[1.0, 2, 3], [0, 1, 2], [11, 12, 13]]))
        shared = ch._SHARED if shm_bytes is None else ch._INLINE
        assert sent == {socket.AF_UNIX: [shared] * 2, socket.AF_INET: [ch._INLINE] * 2}
        router.broadcast(b"boom")
        with pytest.raises(ChannelError, match="ValueError: bad plan") as err:
            router.gather(torch.empty(3, 3), SPANS, 5.0, 0.05, lambda: None)
        assert err.value.rank == 1 and not err.value.closed
    finally:
        ch._send = real_send
        router.close()
    router, socks = _channel_pair(shm_bytes)
    try:
        socks[0].shutdown(socket.SHUT_RDWR)          # rank 0's process "dies"
        with pytest.raises(ChannelError) as err:     # sending to it (Unix socket) or reading from it (TCP)
            router.broadcast(b"go")
            router.gather(torch.empty(3, 3), SPANS, 5.0, 0.05, lambda: None)
        assert err.value.rank == 0 and err.value.closed
        assert router.closed_ranks(0.5) == [0]
    finally:
        router.close()


# ---- fixtures: checkpoints, the reference, one Ray cluster --------------------------------------------------

@pytest.fixture(scope="module")
def target(tiny_mixtral):
    return tiny_mixtral


@pytest.fixture(scope="module")
def draft(tiny_llama_draft):
    return tiny_llama_draft


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """MLA, a dense first layer, shared experts, sigmoid group-limited routing."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    torch.manual_seed(2)
    d = tmp_path_factory.mktemp("ep_deepseek")
    DeepseekV3ForCausalLM(DeepseekV3Config(
        vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_group=4, topk_group=2, initializer_range=0.2,
        eos_token_id=None)).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def plain(target):
    """The single-process engine and its greedy outputs without speculation."""
    eng = Engine.from_pretrained(target, max_batch=8, max_seq_len=128)
    outs = eng.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    return eng, [o.token_ids for o in outs]


def test_ep_runner_refuses_bad_arguments_before_starting_anything(target, draft):
    from specmoe.experts.ep_runner import EPRunner
    with pytest.raises(ValueError, match="no routed experts"):
        EPRunner(draft, ep=2)
    with pytest.raises(ValueError, match="needs at least as many experts, the model has 8"):
        EPRunner(target, ep=16)
    with pytest.raises(ValueError, match="placement_strategy 'CLOSE'"):
        EPRunner(target, ep=2, placement_strategy="CLOSE")
    with pytest.raises(ValueError, match="expert_load has 3 entries, the model has 8"):
        EPRunner(target, ep=2, expert_load=[1, 2, 3])
    with pytest.raises(ValueError, match="control 'rpc'"):
        EPRunner(target, ep=2, control="rpc")


@pytest.fixture(scope="module")
def ray_cluster():
    """Two Ray nodes on this machine, each with one unit of the custom resource
    `ep_node` (the SPREAD test places one worker per node with it)."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "resources": {"ep_node": 1}, "include_dashboard": False})
    cluster.add_node(num_cpus=4, resources={"ep_node": 1})
    try:
        ray.init(address=cluster.address, include_dashboard=False)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def runners(ray_cluster, target):
    """EP runners of the Mixtral target by degree, started on first use and closed at the end."""
    from specmoe.experts.ep_runner import EPRunner
    made = {}

    def get(ep: int, control: str = "socket"):
        if (ep, control) not in made:
            made[ep, control] = EPRunner.from_pretrained(target, ep=ep, max_seqs=8, max_seq_len=128,
                                                         num_cpus_per_worker=0.5, control=control)
        return made[ep, control]
    yield get
    for r in made.values():
        r.close()


# ---- logits --------------------------------------------------------------------------------------------------

def _ragged_steps():
    """A prefill of three sequences on scattered slots, then a ragged verification step."""
    return [([Chunk(0, 0, PROMPTS[0]), Chunk(5, 0, PROMPTS[1]), Chunk(2, 0, PROMPTS[4])], None),
            ([Chunk(0, 8, [3, 4, 5]), Chunk(5, 11, [9]), Chunk(2, 12, [1, 2, 3, 4, 5])], [3, 1, 5])]


@pytest.mark.parametrize("ep,control", [(1, "socket"), (2, "socket"), (4, "socket"), (2, "actor")])
def test_logits_and_routing_equal_single_process(ep, control, runners, target):
    """The socket control plane (default) at every degree, plain actor calls at EP=2
    (the compiled graph: the engine test below)."""
    ref = ModelRunner.from_pretrained(target, max_seqs=8, max_seq_len=128)
    runner = runners(ep, control)
    for chunks, rows in _ragged_steps():
        want = ref.run(chunks, all_logits=rows is None, num_logits=rows, routing=True)
        got = runner.run(chunks, all_logits=rows is None, num_logits=rows, routing=True)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        assert torch.equal(got.routing.tokens_per_expert, want.routing.tokens_per_expert)
        x = got.extra
        assert x["ep"] == ep and len(x["a2a_s"]) == ep
        assert sum(x["attn_tokens_per_rank"]) == sum(len(c.tokens) for c in chunks)
        distinct = [sum(r[layer] for r in x["distinct_experts_per_rank"]) for layer in range(4)]
        assert distinct == want.routing.distinct_experts
        out_bytes = torch.tensor(x["a2a_layer_bytes_out"]).sum(dim=0)
        in_bytes = torch.tensor(x["a2a_layer_bytes_in"]).sum(dim=0)
        assert torch.equal(out_bytes, in_bytes)
        assert (out_bytes == 0).all() if ep == 1 else (out_bytes > 0).all()
    eng = Engine(runner)
    torch.testing.assert_close(eng.logits(PROMPTS[3]), Engine(ref).logits(PROMPTS[3]), atol=1e-5, rtol=0)
    # With `full`, every row's argmax comes back and only the full chunks' rows
    # travel (here a rank has none of them in some masks).
    chunks, rows = _ragged_steps()[1]
    every = ref.run(chunks, num_logits=rows).logits
    for full in ([True, False, True], [False, False, False], [False, True, False], [True, True, True]):
        got = runner.run(chunks, num_logits=rows, full=full)
        assert torch.equal(got.argmax, every.argmax(dim=-1))
        keep = [r for f, lo, n in zip(full, [0, 3, 4], rows) if f for r in range(lo, lo + n)]
        torch.testing.assert_close(got.logits, every[keep], atol=1e-5, rtol=0)
        want = ref.run(chunks, num_logits=rows, full=full)
        assert torch.equal(want.argmax, got.argmax) and torch.equal(want.logits, every[keep])
    with pytest.raises(ValueError, match="full has 2 entries for 3 chunks"):
        runner.run(chunks, num_logits=rows, full=[True, False])
    # With `sample`, a sampled chunk of one-hot drafts is verified where its rows are (its worker) on the
    # uniforms its spec carries: the outcome equals verifying its full rows here, and its rows stay there.
    specs = [SampleSpec(5.0, 0, 1.0, [1e-12, 1e-12, 0.9]), None, SampleSpec(1.3, 4, 1.0, [0.01, 0.2, 0.5, 0.7, 0.99])]
    want = [verify_sampling_u(probs_from_logits(every[lo:lo + n], sp.temperature, sp.top_k, sp.top_p),
                              c.tokens[len(c.tokens) - n + 1:], None, sp.u)
            for sp, c, lo, n in zip(specs, chunks, [0, 3, 4], rows) if sp is not None]
    assert want[0][0] == 2 and want[1][0] < 4, want   # all accepted (tiny coins, no filter), and a rejection
    for r in (runner, ref):
        got = r.run(chunks, num_logits=rows, full=[False, True, False], sample=specs)
        assert got.sampled == want
        assert got.logits.shape[0] == 1 and torch.equal(got.argmax, every.argmax(dim=-1))
    with pytest.raises(ValueError, match="chunk 0 has a sample spec, so its full flag must be False"):
        runner.run(chunks, num_logits=rows, full=[True, True, False], sample=specs)
    with pytest.raises(ValueError, match="chunk 2: 5 uniforms for 4 logits rows"):
        runner.run(chunks, num_logits=[3, 1, 4], full=[False, True, False], sample=specs)
    with pytest.raises(ValueError, match="sample has 2 entries for 3 chunks"):
        runner.run(chunks, num_logits=rows, full=[False, True, False], sample=specs[:2])
    for bad, match in ((specs[0]._replace(temperature=0.0), "temperature 0.0"),
                       (specs[0]._replace(top_p=1.5), "top_p 1.5"),
                       (specs[0]._replace(u=[0.5, 1.0, 0.2]), r"uniforms \[0.5, 1.0, 0.2\]")):
        with pytest.raises(ValueError, match=match):
            runner.run(chunks, num_logits=rows, full=[False, True, False], sample=[bad, None, specs[2]])
    assert runner.run(chunks, num_logits=rows, full=[False, True, False], sample=specs).sampled == want  # serving


def test_deepseek_mla_shared_experts_logits_at_ep2_and_close_releases_workers(ray_cluster, deepseek):
    import ray
    from ray.exceptions import RayActorError
    from ray.util import placement_group_table

    from specmoe.experts.ep_runner import EPRunner, EPWorkerError
    ref = ModelRunner.from_pretrained(deepseek, max_seqs=4, max_seq_len=64)
    runner = EPRunner.from_pretrained(deepseek, ep=2, max_seqs=4, max_seq_len=64, num_cpus_per_worker=0.5)
    workers, pg = list(runner.workers), runner.pg
    try:
        # slot 0 only: rank 1 holds no sequence and joins the MoE layers with zero tokens
        for chunks in ([Chunk(0, 0, PROMPTS[4])], [Chunk(0, 0, PROMPTS[1]), Chunk(1, 0, PROMPTS[2])]):
            want = ref.run(chunks, all_logits=True, routing=True)
            got = runner.run(chunks, all_logits=True, routing=True)
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
            assert torch.equal(got.routing.tokens_per_expert, want.routing.tokens_per_expert)
    finally:
        runner.close()
    for w in workers:
        with pytest.raises(RayActorError):
            ray.get(w.node.remote(), timeout=30)
    assert placement_group_table(pg)["state"] == "REMOVED"
    with pytest.raises(EPWorkerError, match="closed"):
        runner.run([Chunk(0, 0, [1])])


def test_a_rank_without_sequences_joins_and_bytes_match_routing(runners, target):
    """Batch 1 at EP=2: rank 1 has no sequence, yet computes its experts for
    rank 0's tokens; rank 0 sends exactly the rows routed to rank 1's experts."""
    ref = ModelRunner.from_pretrained(target, max_seqs=8, max_seq_len=128)
    runner = runners(2)
    chunks = [Chunk(0, 0, PROMPTS[1])]
    want = ref.run(chunks, routing=True)
    got = runner.run(chunks, routing=True)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
    x = got.extra
    assert x["attn_tokens_per_rank"] == [len(PROMPTS[1]), 0]
    held1 = runner.placement.experts_of(1)
    to_rank1 = want.routing.tokens_per_expert[:, held1].sum(dim=1)          # rows per layer
    row_bytes = 64 * 4
    assert x["a2a_layer_bytes_out"][0] == (to_rank1 * row_bytes).tolist()  # dispatch out of rank 0
    assert x["a2a_layer_bytes_out"][1] == (to_rank1 * row_bytes).tolist()  # combine back from rank 1
    assert [sum(layer) for layer in x["tokens_per_local_expert"][1]] == to_rank1.tolist()


# ---- greedy generation ---------------------------------------------------------------------------------------

SPECS = {"off": "off", "ngram": {"method": "ngram", "k": 3},
         "layer_skip": {"method": "layer_skip", "k": 2, "layers": 2}, "draft_model": {"method": "draft_model", "k": 3}}


@pytest.mark.parametrize("ep", [2, 4])
@pytest.mark.parametrize("kind", list(SPECS))
def test_greedy_generation_equals_single_process(kind, ep, runners, plain, draft):
    ref_eng, want = plain
    spec = SPECS[kind]
    if kind == "draft_model":
        spec = {**spec, "draft_model": str(draft)}
    eng = Engine(runners(ep), speculation=spec)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = eng.generate(PROMPTS, params)
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    if kind != "off":
        assert sum(o.stats.draft_tokens for o in outs) > 0
    assert eng.runner.cache.free_slots == eng.runner.cache.num_slots


def test_ragged_k_and_batch_one_steps_with_an_idle_rank(runners, plain, draft):
    ref_eng, want = plain
    eng = Engine(runners(2), speculation={"method": "draft_model", "k": 4, "draft_model": str(draft)})
    ks = [{"k": 0}, "off", {"k": 2}, None, {"k": 7}]
    outs = eng.generate(PROMPTS, [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, speculation=s) for s in ks])
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    assert outs[0].stats.draft_tokens == 0 and outs[4].stats.draft_tokens > 0
    # batch 1: every step leaves one of the two ranks without a sequence
    idle_steps, got = 0, []
    for chunk in eng.generate_stream([PROMPTS[2]], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)):
        got += chunk.token_ids
        idle_steps += 0 in eng.last_step.extra["attn_tokens_per_rank"]
    assert_same_or_near_tie(ref_eng, PROMPTS[2], want[2], got)
    assert idle_steps >= 1


def test_engine_from_pretrained_ep_and_compiled_graph_control(ray_cluster, target, plain):
    """The public entry point (joins the running Ray), and the compiled-graph control plane."""
    import ray
    from ray.exceptions import RayActorError

    from specmoe.experts.ep_runner import EPRunner
    ref_eng, want = plain
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    eng = Engine.from_pretrained(target, ep=2, max_batch=8, max_seq_len=128, speculation={"method": "ngram", "k": 3})
    workers = list(eng.runner.workers)
    try:
        outs = eng.generate(PROMPTS[:3], params)
    finally:
        eng.close()
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    with pytest.raises(RayActorError):
        ray.get(workers[0].node.remote(), timeout=30)
    runner = EPRunner.from_pretrained(target, ep=2, max_seqs=8, max_seq_len=128, num_cpus_per_worker=0.5,
                                      control="compiled")
    try:
        eng = Engine(runner, speculation={"method": "layer_skip", "k": 2, "layers": 2})
        outs = eng.generate(PROMPTS, params)
        assert eng.last_step.extra["control_plane_s"] >= 0
    finally:
        runner.close()
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)


def test_few_row_linears_reaches_every_worker_process(ray_cluster, target, monkeypatch):
    """The option is set in each EP worker's own process (and the router's): at
    0 one-row decode steps make no transposed copy on any rank; at 2 they do."""
    import ray

    from specmoe.experts.ep_runner import EPRunner
    from specmoe.kernels import linear as few_rows
    monkeypatch.setattr(few_rows, "SMALL_ROWS", few_rows.SMALL_ROWS)
    for rows in (0, 2):
        runner = EPRunner.from_pretrained(target, ep=2, max_seqs=2, max_seq_len=64, num_cpus_per_worker=0.5,
                                          few_row_linears=rows)
        try:
            assert few_rows.SMALL_ROWS == rows
            runner.run([Chunk(0, 0, PROMPTS[0]), Chunk(1, 0, PROMPTS[1])])          # slot s on rank s % 2
            runner.run([Chunk(0, 8, [3]), Chunk(1, 11, [9])])
            info = ray.get([w.linear_copies.remote() for w in runner.workers], timeout=60)
        finally:
            runner.close()
        assert [i["few_row_linears"] for i in info] == [rows, rows]
        if rows == 0:
            assert [(i["copies"], i["bytes"]) for i in info] == [(0, 0), (0, 0)]
        else:
            assert all(i["copies"] >= 3 and i["bytes"] > 0 for i in info), info   # LM head and attention


def test_seeded_sampling_with_a_draft_model_equals_single_process(runners, target, draft):
    """Rejection sampling runs in the router on the gathered logits: the same
    seed gives the same tokens as the single-process engine."""
    spec = {"method": "draft_model", "k": 3, "draft_model": str(draft)}
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.8, top_p=0.95, seed=10 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    want = Engine.from_pretrained(target, max_batch=8, max_seq_len=128, speculation=spec).generate(PROMPTS, params)
    got = Engine(runners(2), speculation=spec).generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert sum(o.stats.accepted_tokens for o in got) > 0


def test_greedy_and_sampled_requests_in_one_step_under_ep(runners, target):
    """Greedy requests' rows come back as their argmax only, sampled ones' in
    full, from the target and from the layer-skip drafter on the workers:
    a batch alternating the two, seeded, equals the single-process engine."""
    spec = {"method": "layer_skip", "k": 3, "layers": 2}
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True,
                             **({"temperature": 0.8, "top_p": 0.95, "seed": i} if i % 2 else {}))
              for i in range(len(PROMPTS))]
    want = Engine.from_pretrained(target, max_batch=8, max_seq_len=128, speculation=spec).generate(PROMPTS, params)
    got = Engine(runners(2), speculation=spec).generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(o.stats.draft_tokens > 0 for o in got)


@pytest.mark.parametrize("spec", [{"method": "ngram", "k": 3}, "off"], ids=["ngram", "off"])
def test_sampled_requests_with_one_hot_drafts_are_verified_on_the_workers(spec, runners, target):
    """Sampled requests whose drafts are one-hot (n-gram) or absent: their
    verification runs on the EP workers on the uniforms the plan carries, no
    logits row comes back, and the same seeds give the single-process tokens."""
    params = [SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.9, top_p=0.9, seed=30 + i)
              for i in range(len(PROMPTS))]
    want = Engine.from_pretrained(target, max_batch=8, max_seq_len=128, speculation=spec).generate(PROMPTS, params)
    runner = runners(2)
    rows_back = []
    run = runner.run

    def spy(*a, **kw):
        out = run(*a, **kw)
        rows_back.append(out.logits.shape[0])
        return out
    runner.run = spy
    try:
        got = Engine(runner, speculation=spec).generate(PROMPTS, params)
    finally:
        del runner.run
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert rows_back and not any(rows_back)
    if spec != "off":
        assert sum(o.stats.accepted_tokens for o in got) > 0


# ---- two nodes, balanced placement -----------------------------------------------------------------------------

def test_two_nodes_spread_with_balanced_placement_give_the_same_output(ray_cluster, target, plain):
    from specmoe.experts.ep_runner import EPRunner
    ref_eng, want = plain
    ref_eng.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    load = ref_eng.last_step.tokens_per_expert
    per_expert = [sum(layer[e] for layer in load) + e * 0.01 for e in range(8)]   # measured, ties broken
    runner = EPRunner.from_pretrained(target, ep=2, max_seqs=8, max_seq_len=128, num_cpus_per_worker=0.5,
                                      placement_strategy="SPREAD", bundle_resources={"ep_node": 1},
                                      expert_load=per_expert)
    try:
        assert len({node_id for node_id, _, _ in runner.nodes}) == 2, runner.nodes
        assert sorted(runner.links) == ["tcp", "unix+shm"]    # the worker off the router's node: TCP
        assert runner.placement != contiguous(8, 2)
        outs = Engine(runner, speculation={"method": "ngram", "k": 3}).generate(
            PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        for p, w, o in zip(PROMPTS, want, outs):
            assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    finally:
        runner.close()


def test_auto_speculation_under_ep(ray_cluster, target, plain):
    """speculation "auto" on the EP runner: the controller prices the all-to-all
    (it knows the degree), profiles through the workers and stays lossless;
    ep_options reach the runner."""
    ref_eng, want = plain
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    eng = Engine.from_pretrained(target, ep=2, max_batch=8, max_seq_len=128, speculation="auto",
                                 ep_options={"num_cpus_per_worker": 0.5})
    try:
        assert eng.controller.cost.ep == 2 and eng.controller.cost.a2a_mb_per_token > 0
        assert eng.controller.cost.profile_seconds > 0
        outs = eng.generate(PROMPTS, params)
    finally:
        eng.close()
    for p, w, o in zip(PROMPTS, want, outs):
        assert_same_or_near_tie(ref_eng, p, w, o.token_ids)
    with pytest.raises(ValueError, match="ep_options"):
        Engine.from_pretrained(target, max_batch=2, max_seq_len=64, ep_options={"control": "compiled"})


# ---- failure ---------------------------------------------------------------------------------------------------

# Last in the module: killing a worker of a compiled graph can take its node's raylet down with it
# (seen once: a later test's workers then died at start-up).
def test_worker_killed_between_steps_of_a_compiled_graph_is_named(ray_cluster, target):
    """A worker dies between two steps: the compiled graph's monitor closes its
    channels, so the next plan's write fails before any result is read (a
    RayChannelError that escaped as such once in CI). It ends as the same
    EPWorkerError naming the dead rank as a death mid-step does."""
    import ray

    from specmoe.experts.ep_runner import EPRunner, EPWorkerError
    runner = EPRunner.from_pretrained(target, ep=2, max_seqs=8, max_seq_len=128, num_cpus_per_worker=0.5,
                                      collective_timeout_s=30, control="compiled")
    eng = Engine(runner)
    try:
        eng.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))      # warm: it works
        ray.kill(runner.workers[1])
        time.sleep(3.0)                         # the graph's monitor notices and tears the channels down
        with pytest.raises(EPWorkerError, match=r"rank 1 of 2 died"):
            eng.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))
    finally:
        runner.close()


@pytest.mark.parametrize("control", ["socket", "actor", "compiled"])
def test_killed_worker_is_detected_within_5s_and_nothing_hangs(control, ray_cluster, target):
    import ray
    from ray.util import placement_group_table

    from specmoe.experts.ep_runner import EPRunner, EPWorkerError
    runner = EPRunner.from_pretrained(target, ep=2, max_seqs=8, max_seq_len=128, num_cpus_per_worker=0.5,
                                      collective_timeout_s=30, control=control)
    pg = runner.pg
    eng = Engine(runner)
    killed = {}

    def kill():
        killed["at"] = time.monotonic()
        ray.kill(runner.workers[1])
    try:
        eng.generate(PROMPTS[:2], SamplingParams(max_tokens=4, ignore_eos=True))      # warm: it works
        timer = threading.Timer(0.5, kill)
        timer.start()
        with pytest.raises(EPWorkerError, match=r"rank 1 of 2 died") as err:
            eng.generate(PROMPTS, SamplingParams(max_tokens=100, ignore_eos=True))     # runs well past 0.5 s
        detected = time.monotonic() - killed["at"]
        print(f"[{control}] killed worker noticed after {detected:.2f} s")
        assert detected < 5.0, f"a killed worker was noticed after {detected:.1f} s"
        assert "all EP workers were stopped" in str(err.value)
        assert placement_group_table(pg)["state"] == "REMOVED"
        t0 = time.monotonic()
        with pytest.raises(EPWorkerError, match="rank 1"):                              # later calls fail fast
            eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2))
        assert time.monotonic() - t0 < 1.0
    finally:
        runner.close()

