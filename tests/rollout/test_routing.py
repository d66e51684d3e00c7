"""MoE routing replay (rollout.routing): what the engine records, what the trainer's forward replays, and that
replaying the bf16 rollout's experts lowers the fp32 trainer's KL(μ‖π)."""
import pytest
import torch

from cispo.config import RecipeError, load_recipe
from rollout.engine import generate
from rollout.model import build_model
from rollout.routing import RoutingRecorder, RoutingReplay, routers, routing_rows
from rollout.states import KeptStates
from rollout.trajectory import Request, SamplingParams, Trajectory
from tests.conftest import REPO

QWEN3_MOE = dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                 norm_topk_prob=True)
MODELS = {"minimax": ("tiny", {}), "qwen3_moe": ("tiny-llama", QWEN3_MOE), "qwen3_5_moe": ("tiny-qwen3_5_moe", {})}
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 7, 3]]  # different lengths: the short one is left-padded at prefill


def _model(name):
    torch.manual_seed(0)
    preset, overrides = MODELS[name]
    return build_model(preset, 32, **overrides).eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_the_engine_records_each_fed_token_and_replay_reproduces_the_forward(name):
    model = _model(name)
    recorder = RoutingRecorder(model)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    out = generate(model, [Request(p, n=2, seed=i, params=params) for i, p in enumerate(PROMPTS)], pad_id=0,
                   recorder=recorder)
    layers, k = len(routers(model)), model.config.num_experts_per_tok
    replay = RoutingReplay(model)
    for t in out:
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        assert t.routing.shape == (ids.shape[1] - 1, layers, k)  # every token but the last was fed
        with torch.no_grad():
            own = model(ids).logits
            # The teacher-forced forward routes the prompt (prefill) and each response token (decode) alike.
            assert torch.equal(recorder.take()[:-1].sort(-1).values, t.routing.sort(-1).values)
            replay.set(t.routing.unsqueeze(0), ids.shape[1])
            replayed = model(ids).logits
            # Other experts than the recorded ones: the replay is what routes the forward.
            replay.set((t.routing.unsqueeze(0) + 1) % routers(model)[0].num_experts, ids.shape[1])
            rotated = model(ids).logits
            replay.set(None)
        assert (replayed - own).abs().max() < 1e-5
        assert (rotated - own).abs().max() > 1e-3


def test_replay_takes_the_experts_and_the_routers_own_renormalized_weights():
    model = _model("minimax")
    block = next(m for m in model.modules() if type(m).__name__ == "MiniMaxSparseMoeBlock")
    router = block.gate
    x = torch.randn(3, router.weight.shape[1])
    chosen = torch.tensor([[3, 0], [1, 2], [-1, -1]])  # the last token is not recorded: the router's own top-k
    replay = RoutingReplay(model)
    routing = torch.zeros(1, 3, len(routers(model)), 2, dtype=torch.int16)
    routing[0, :, 0] = chosen
    replay.set(routing, 3)  # the first router's forward of 3 tokens
    logits, weights, indices = router(x)
    probs = torch.softmax(x @ router.weight.T, -1)
    own = probs.topk(2).indices[2]
    assert indices.tolist() == [[3, 0], [1, 2], own.tolist()]
    for row, experts in enumerate(indices):
        expected = probs[row, experts] / probs[row, experts].sum()
        assert torch.allclose(weights[row], expected, atol=1e-6)
    # The router keeps its gradient through the replayed experts' weights.
    weights.sum(0)[0].backward()
    assert router.weight.grad.abs().sum() > 0


def test_replay_refuses_models_it_does_not_cover_and_a_mismatched_forward():
    with pytest.raises(ValueError, match="needs an MoE model; this qwen3_moe model has no MoE layer"):
        RoutingRecorder(build_model("tiny-llama", 32, **QWEN3_MOE, mlp_only_layers=[0, 1]))  # both layers dense
    with pytest.raises(ValueError, match="does not cover model type 'nemotron_h'"):
        RoutingReplay(build_model("tiny-nemotron_h", 32))
    with pytest.raises(RecipeError, match="does not cover model type 'llama'"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["algorithm.routing_replay=true", "model.preset=tiny-llama"])
    model = _model("minimax")
    replay = RoutingReplay(model)
    replay.set(torch.zeros(1, 4, len(routers(model)), 2, dtype=torch.int16), 5)
    with pytest.raises(ValueError, match="routes 6 tokens but 5 were set"):
        model(torch.ones(1, 6, dtype=torch.long))
    with pytest.raises(RecipeError, match="only rollout.engine: cispo records"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["algorithm.routing_replay=true", "rollout.engine=hf"])


def test_a_continued_sample_keeps_its_latest_routing_and_fills_unrecorded_tokens_from_before():
    first = Trajectory.sampled([1, 2], [3, 4], [-0.1, -0.2], "length", 0, torch.tensor([[[0]], [[1]], [[2]]]))
    # The continuation re-prefilled [1, 2, 3, 4], except a kept state's first two tokens (not recorded).
    later = Trajectory.sampled([1, 2, 3, 4], [5], [-0.3], "stop", 1, torch.tensor([[[-1]], [[-1]], [[3]], [[3]]]))
    first.extend(later)
    assert first.routing.flatten().tolist() == [0, 1, 3, 3]
    rows = routing_rows([first, Trajectory.sampled([1], [2], [-0.5], "stop", 0)], width=5)
    assert rows[..., 0, 0].tolist() == [[0, 1, 3, 3, -1], [-1] * 5]


def test_replaying_the_bf16_rollouts_experts_lowers_the_fp32_trainers_kl(tiny_model_dir):
    from experiments.routing_replay import measure

    params = SamplingParams(max_new_tokens=24)
    figures = measure(tiny_model_dir, [Request([1, 4 + i, 9, 12 + i], n=4, seed=i, params=params) for i in range(6)])
    own, replayed = figures["own_routing"], figures["replayed"]
    assert own["routing_differs"] > 0  # bf16 flipped some of the trainer's top-k choices
    assert replayed["mismatch_kl"] < own["mismatch_kl"]


def test_a_turn_from_a_kept_session_state_records_only_the_tokens_it_prefills():
    model = _model("minimax")
    recorder, kept = RoutingRecorder(model), KeptStates(limit=4)
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    [first] = generate(model, [Request(PROMPTS[0], seed=1, params=params, session=9)], pad_id=0, kept=kept,
                       recorder=recorder)
    history = first.prompt_ids + first.response_ids + [3, 4]  # the turn's tokens, then a tool's
    [second] = generate(model, [Request(history, seed=2, params=params, session=9)], pad_id=0, kept=kept,
                        recorder=recorder)
    assert second.outcomes["state_kept"] == 1
    fed = len(PROMPTS[0]) + len(first.response_ids) - 1  # the kept state's tokens: not prefilled again
    assert (second.routing[:fed] == -1).all()
    with torch.no_grad():
        model(torch.tensor([second.prompt_ids + second.response_ids]))
    own = recorder.take()[:-1]
    assert torch.equal(own[fed:].sort(-1).values, second.routing[fed:].sort(-1).values)
    first.extend(second)  # the episode's routing: the first turn's where the second has none
    assert torch.equal(first.routing[:fed].sort(-1).values, own[:fed].sort(-1).values)
