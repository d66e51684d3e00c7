"""Real DeepSpeed engines (gloo) inside Ray actors: SFT, weight publishing, and the same CISPO updates
on 1 or 2 ranks, ZeRO-2 or ZeRO-3, one or many micro-batches."""
from collections import Counter

import pytest
import torch

from cispo.batching import TrainBatch, pad_rows, rl_batch as build_rl_batch
from cispo.collect import Group
from cispo.config import RecipeError, load_recipe
from cispo.export import trained_model
from cispo.trainer import TrainerGroup, merge_rank_figures
from rollout.config import RolloutConfig
from rollout.engine import generate
from rollout.model import load_model, token_logprobs
from rollout.trajectory import Request, SamplingParams
from rollout.worker import RolloutPool
from tests.conftest import REPO


def test_trainer_learns_and_publishes_versioned_weights(ray_session, two_layer_model_dir, tiny_tokenizer):
    """To the replica its rank hosts (resources.colocate; publishing to RolloutWorker actors is the same
    object-store hand-off, and tests/rollout/test_worker.py checks their versioned loads)."""
    tok = tiny_tokenizer
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["sft.lr=0.003", "run.threads=2"])
    trainers = TrainerGroup.start(recipe, str(two_layer_model_dir))
    pool = RolloutPool.hosted(trainers.ranks, str(two_layer_model_dir), tok.pad_token_id, RolloutConfig(threads=2))
    try:
        enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
        rows = [(tok(f"{a}+{b}=")["input_ids"], enc(f"\\boxed{{{a + b}}}") + [tok.eos_token_id])
                for a, b in [(1, 2), (3, 4), (10, 20), (7, 7)]]
        losses = [trainers.sft(pad_rows(rows, tok.eos_token_id)) for _ in range(25)]
        assert losses[-1] < 0.5 * losses[0]

        trainers.publish(pool, version=7)
        request = Request(rows[0][0], n=2, seed=3, params=SamplingParams(max_new_tokens=12, temperature=1.0))
        remote = pool.generate([request])
        state = trainers.state_dict()
        local_model = load_model(two_layer_model_dir)
        local_model.load_state_dict(state)
        local = generate(local_model.eval(), [request], tok.pad_token_id)
        assert [c.response_ids for c in remote] == [c.response_ids for c in local]
        assert all(c.versions == [7] * len(c.response_ids) for c in remote) and pool.version == 7
        # The published weights are the trained ones, not the initial ones.
        initial = load_model(two_layer_model_dir).state_dict()
        assert any(not torch.equal(initial[k], v) for k, v in state.items())
        # The replica's weights are its own copy: training on after a publish leaves them at that version.
        trainers.sft(pad_rows(rows, tok.eos_token_id))
        assert [(c.response_ids, c.logprobs) for c in pool.generate([request])] == \
            [(c.response_ids, c.logprobs) for c in remote]
        assert any(not torch.equal(state[k], v) for k, v in trainers.state_dict().items())  # the rank moved on
    finally:
        pool.shutdown()  # leaves the hosts running: the ranks still answer
        assert trainers.nodes()
        trainers.shutdown()


# Slow: a bf16 rollout worker and two trainer starts on the 8-layer model (24-39 s). The quick loop keeps the same
# claim in-process, on the same requests: tests/rollout/test_routing.py's replaying-lowers-the-KL test.
@pytest.mark.slow
def test_routing_replay_lowers_the_ranks_measured_mismatch_with_bf16_rollouts(ray_session, tiny_model_dir,
                                                                           tiny_tokenizer):
    """algorithm.routing_replay end to end: bf16 rollout workers record each token's experts, the batch carries
    them, and the ranks' π_old (old_logprobs: recompute, before any update) replays them."""
    tok = tiny_tokenizer
    pool = RolloutPool.start(1, str(tiny_model_dir), tok.pad_token_id, RolloutConfig(threads=2, dtype="bf16"),
                             record_routing=True)
    try:
        params = SamplingParams(max_new_tokens=24)
        out = pool.generate([Request([1, 4 + i, 9, 12 + i], n=4, seed=i, params=params) for i in range(6)])
    finally:
        pool.shutdown()
    for i, t in enumerate(out):
        t.reward, t.status = float(i % 2), "ok"
    groups = [Group(None, out[4 * i:4 * i + 4]) for i in range(6)]
    figures = {}
    for replay in ("false", "true"):
        recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["run.threads=2", "algorithm.old_logprobs=recompute",
                                                                "algorithm.updates_per_batch=2",
                                                                f"algorithm.routing_replay={replay}"])
        batch = build_rl_batch(groups, recipe.algorithm, 24, tok.eos_token_id)
        trainers = TrainerGroup.start(recipe, str(tiny_model_dir))
        try:
            figures[replay] = trainers.train(batch, step=1)
        finally:
            trainers.shutdown()
    assert figures["true"]["routing_replayed_fraction"] == 1.0 and "routing_replayed_fraction" not in figures["false"]
    assert figures["true"]["mismatch_kl"] < figures["false"]["mismatch_kl"]


@pytest.fixture(scope="module")
def rl_batch(two_layer_model_dir, tiny_tokenizer):
    """8 prompt groups of 4 responses with ragged lengths (9-16 tokens), off-policy old logprobs."""
    torch.manual_seed(0)
    groups, g, width = 8, 4, 16
    lengths = torch.randint(9, width + 1, (groups * g,))
    ids = torch.randint(4, len(tiny_tokenizer), (groups * g, width))
    mask = torch.zeros(groups * g, width - 1)
    for i, n in enumerate(lengths.tolist()):
        ids[i, n:] = tiny_tokenizer.eos_token_id
        mask[i, 4:n - 1] = 1
    with torch.no_grad():
        model = load_model(two_layer_model_dir)
        old = token_logprobs(model.model(input_ids=ids).last_hidden_state[:, :-1], model.lm_head.weight, ids[:, 1:])[0]
    return TrainBatch(ids, mask, lengths, (old + 0.05 * torch.randn_like(old)) * mask, torch.randn(groups * g),
                      torch.arange(groups).repeat_interleave(g), torch.zeros_like(mask, dtype=torch.long))


def _trajectory(ray, args, model_dir, batch, checkpoint_dir=None, steps=3):
    """`steps` RL steps on `batch` by a fresh TrainerGroup (2 updates each unless `args` say otherwise): each
    step's figures and the final state dict."""
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["optim.lr=1e-3", "optim.warmup_steps=0", "run.threads=1",
                                                            "algorithm.updates_per_batch=2", *args])
    trainers = TrainerGroup.start(recipe, str(model_dir))
    try:
        figures = [trainers.train(batch, step) for step in range(1, steps + 1)]
        state = trainers.state_dict()
        if checkpoint_dir:
            trainers.save(checkpoint_dir)
    finally:
        trainers.shutdown()
    return figures, state


MICRO = "trainer.micro_batch_tokens=40"  # 2-3 rows per micro-batch, 3-4 micro-batches per update and rank
OFFLOAD = "trainer.deepspeed={zero_optimization: {offload_optimizer: {device: cpu}, offload_param: {device: cpu}}}"


# The quick loop runs micro-batches on two ZeRO-3 ranks (partitioned weights, and a minibatch's loss weights split
# across ranks and micro-batches); the other layouts (10-20 s each), one rank's micro-batches among them, run in
# `make test`.
@pytest.mark.parametrize("args, loss_rtol, weight_atol", [
    pytest.param([MICRO], 1e-4, 1e-4, id="micro-batches", marks=pytest.mark.slow),
    pytest.param(["trainer.num_ranks=2", MICRO], 1e-4, 1e-4, id="2-ranks-zero2", marks=pytest.mark.slow),
    pytest.param(["trainer.num_ranks=2", "trainer.zero_stage=3", MICRO], 1e-4, 1e-4, id="2-ranks-zero3"),
    pytest.param(["trainer.zero_stage=3", "trainer.gradient_checkpointing=true", OFFLOAD, MICRO], 1e-4, 1e-4,
                 id="zero3-offload-checkpointing", marks=pytest.mark.slow),
    # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); measured 3e-3 on the loss.
    pytest.param(["trainer.num_ranks=2", "trainer.deepspeed={bf16: {enabled: true}}", MICRO], 1e-2, None,
                 id="2-ranks-bf16", marks=pytest.mark.slow),
])
def test_ranks_zero_stages_and_micro_batches_give_one_trajectory(ray_session, two_layer_model_dir, rl_batch, reference,
                                                                 args, loss_rtol, weight_atol, tmp_path):
    """The loss weights of a whole minibatch travel with each micro-batch, so every layout computes the
    same sums in a different order. fp32 reordering differs by ~1e-7 relative per step; 3 steps of 2 Adam
    updates at lr 1e-3 can grow that, so the bound is 1e-4 relative on the loss and 1e-4 absolute on the
    weights."""
    one, state_one = reference
    other, state = _trajectory(ray_session, ["trainer.zero_stage=2", *args], two_layer_model_dir, rl_batch,
                               tmp_path / "ckpt")
    assert other[0]["padding_fraction"] < one[0]["padding_fraction"] / 2  # bucketed by length
    for a, b in zip(one, other):
        assert abs(a["loss"] - b["loss"]) <= loss_rtol * max(1.0, abs(a["loss"])), (one, other)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=loss_rtol)
    assert other[-1]["skipped_steps"] == 0
    assert state.keys() == state_one.keys()
    if weight_atol:
        assert all(torch.allclose(state[k], v, atol=weight_atol) for k, v in state_one.items())
        # What `cispo export` rebuilds from the ranks' partitions is what was published.
        exported = trained_model(tmp_path / "ckpt", two_layer_model_dir).state_dict()
        assert all(torch.equal(exported[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def reference(ray_session, two_layer_model_dir, rl_batch):
    """1 rank, ZeRO-2, one micro-batch per update."""
    steps, state = _trajectory(ray_session, ["trainer.zero_stage=2"], two_layer_model_dir, rl_batch)
    assert steps[0]["updates"] == 2 and steps[0]["padding_fraction"] > 0.1  # one micro-batch pads to 16
    assert steps[0]["loss"] != steps[-1]["loss"]  # it trained
    return steps, state


# Slow: 2 ZeRO-3 ranks (21-27 s). The quick loop keeps the recomputed π_old: the correction test below measures it
# against the same noisy μ, and test_end_to_end's short run recomputes it every step to within 1e-4 of the rollout's.
@pytest.mark.slow
def test_recomputed_old_logprobs_make_the_first_update_on_policy(ray_session, two_layer_model_dir, rl_batch):
    """rl_batch's old logprobs are the model's plus N(0, 0.05) noise: recomputing them before the update
    finds that gap (E|noise| = 0.05·√(2/π) ≈ 0.040) and leaves an IS weight of exactly 1."""
    steps, _ = _trajectory(ray_session, ["trainer.num_ranks=2", "trainer.zero_stage=3", MICRO, "algorithm.updates_per_batch=1",
                                         "algorithm.old_logprobs=recompute"], two_layer_model_dir, rl_batch, steps=2)
    assert 0.035 < steps[0]["old_logprob_gap"] < 0.045
    assert steps[0]["is_weight_mean"] == pytest.approx(1.0, abs=1e-6) and steps[0]["is_weight_max"] == pytest.approx(1.0, abs=1e-5)
    assert steps[1]["old_logprob_gap"] > steps[0]["old_logprob_gap"]  # the batch's logprobs are now a step stale


def test_a_misspelled_deepspeed_key_is_named_and_frees_the_ranks(ray_session, two_layer_model_dir):
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["run.threads=1",
                         "trainer.deepspeed={zero_optimization: {offload_optimiser: {device: cpu}}}"])
    before = set(ray_session.util.placement_group_table())
    with pytest.raises(RecipeError, match=r"trainer.deepspeed .*DeepSpeedZeroConfig.*offload_optimiser: Extra inputs"):
        TrainerGroup.start(recipe, str(two_layer_model_dir))
    table = ray_session.util.placement_group_table()
    ours = [g for key, g in table.items() if key not in before]
    assert len(ours) == 1 and ours[0]["state"] == "REMOVED"


def test_rank_figures_merge_into_one_row():
    """Token means weigh each rank by its tokens, the IS-weight max is the ranks' max, fork-token counts
    add up, and a rank whose responses were all masked (no figures) counts for nothing."""
    shared = {"grad_norm": 0.5, "skipped_steps": 0, "lr": 1e-3}
    ranks = [{"loss": 0.25, **shared, "tokens": 3, "entropy": 1.0, "is_weight_max": 2.0, "ppo_zeroed_tokens": Counter({5: 2})},
             {"loss": 0.5, **shared, "tokens": 1, "entropy": 3.0, "is_weight_max": 4.0, "ppo_zeroed_tokens": Counter({5: 1, 6: 1})},
             {"loss": 0.0, **shared, "tokens": 0}]
    row = merge_rank_figures(ranks)
    assert row == {"loss": 0.75, **shared, "ppo_zeroed_tokens": {5: 3, 6: 1}, "is_weight_max": 4.0, "entropy": 1.5}


def test_a_mismatch_correction_reaches_the_loss_on_every_rank(ray_session, two_layer_model_dir, rl_batch):
    """rl_batch's rollout logprobs μ are the model's plus N(0, 0.05) noise, so π_old/μ = exp(−noise) once
    π_old is recomputed: IcePop's band [0.95, 1.05] drops the tokens with |noise| > 0.0513, P(|z| > 1.03)
    ≈ 0.30 of them, and KL(μ ‖ π_old) ≈ E[noise²]/2 = 0.00125. A band no ratio falls in leaves no gradient."""
    icepop = ["algorithm.old_logprobs=recompute", "algorithm.correction=icepop"]
    steps, _ = _trajectory(ray_session, ["trainer.num_ranks=2", MICRO, *icepop, "algorithm.icepop_band=[0.95,1.05]"],
                           two_layer_model_dir, rl_batch, steps=1)
    assert 0.2 < steps[0]["correction_fraction"] < 0.42
    assert steps[0]["mismatch_kl"] == pytest.approx(0.00125, rel=0.3)
    assert 0.09 < steps[0]["mismatch_logprob_p99"] < 0.2  # |noise| at 0.99: 2.58 σ = 0.13
    assert steps[0]["staleness_0"] > 0 and steps[0]["grad_norm"] > 0
    frozen, _ = _trajectory(ray_session, [*icepop, "algorithm.icepop_band=[2,5]"], two_layer_model_dir, rl_batch,
                            steps=1)
    assert frozen[0]["correction_fraction"] == 1.0 and frozen[0]["grad_norm"] == 0.0
