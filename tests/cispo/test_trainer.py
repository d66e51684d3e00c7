"""A real DeepSpeed engine (ZeRO-2, gloo) inside a Ray actor, publishing weights to a RolloutWorker."""
import torch

from cispo.config import load_recipe
from cispo.loop import _free_port, _right_pad
from cispo.trainer import Trainer
from rollout.engine import Request, SamplingParams, generate
from rollout.model import load_model
from rollout.worker import RolloutWorker
from tests.conftest import REPO


def test_trainer_learns_and_publishes_versioned_weights(ray_session, tiny_model_dir, tiny_tokenizer):
    ray = ray_session
    tok = tiny_tokenizer
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["sft.lr=0.003", "run.threads=2"])
    trainer = Trainer.remote(recipe.model_dump_json(), str(tiny_model_dir), 0, 1, _free_port())
    worker = RolloutWorker.remote(str(tiny_model_dir), tok.pad_token_id, 2)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    rows = [([tok.bos_token_id] + enc(f"{a}+{b}="), enc(f"\\boxed{{{a + b}}}") + [tok.eos_token_id])
            for a, b in [(1, 2), (3, 4), (10, 20), (7, 7)]]
    ids, mask = _right_pad(rows, tok.eos_token_id)
    losses = [ray.get(trainer.sft_step.remote(ids, mask))["loss"] for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0]

    state = trainer.state_dict.remote()
    assert ray.get(worker.update_weights.remote(state, 7)) == 7
    request = Request(rows[0][0], n=2, seed=3, params=SamplingParams(max_new_tokens=12, temperature=1.0))
    remote = ray.get(worker.generate.remote([request]))
    local_model = load_model(tiny_model_dir)
    local_model.load_state_dict(ray.get(state))
    local = generate(local_model.eval(), [request], tok.pad_token_id)
    assert [c.token_ids for c in remote] == [c.token_ids for c in local]
    assert all(c.weight_version == 7 for c in remote)
    # The published weights are the trained ones, not the initial ones.
    initial = load_model(tiny_model_dir).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in ray.get(state).items())
    ray.kill(trainer)
    ray.kill(worker)


def _trajectory(ray, recipe_args, model_dir, batch, ranks):
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", recipe_args + [f"trainer.num_ranks={ranks}"])
    port = _free_port()
    trainers = [Trainer.remote(recipe.model_dump_json(), str(model_dir), r, ranks, port) for r in range(ranks)]
    losses = []
    for step in range(5):
        # Rows split by rank, whole prompt groups each (as the controller does); DeepSpeed averages grads.
        shards = [{k: (v.chunk(ranks)[r] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
                  for r in range(ranks)]
        stats = ray.get([t.train_batch.remote(s, 1, step) for t, s in zip(trainers, shards)])
        losses.append(sum(s["loss"] for s in stats) / ranks)
    state = ray.get([t.state_dict.remote() for t in trainers])[0]
    for t in trainers:
        ray.kill(t)
    return losses, state


def test_two_rank_zero2_matches_one_rank(ray_session, tiny_model_dir, tiny_tokenizer):
    """Tolerance 1e-4 relative: the same maths, summed in a different order across ranks (fp32)."""
    torch.manual_seed(0)
    groups, g = 8, 4
    ids = torch.randint(4, len(tiny_tokenizer), (groups * g, 14))
    mask = torch.zeros(groups * g, 13)
    mask[:, 5:] = 1
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        from rollout.model import token_logprobs
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        old = token_logprobs(hidden, model.lm_head.weight, ids[:, 1:])[0] + 0.05 * torch.randn(groups * g, 13)
    batch = {"input_ids": ids, "loss_mask": mask, "old_logprobs": old * mask, "advantages": torch.randn(groups * g),
             "group_index": torch.arange(groups).repeat_interleave(g), "temperature": 1.0}
    args = ["optim.lr=1e-3", "optim.warmup_steps=0", "run.threads=1"]
    one, state_one = _trajectory(ray_session, args + ["trainer.zero_stage=2"], tiny_model_dir, batch, 1)
    for stage in (2,):  # ZeRO-3 is not supported yet: the fp32 head reads lm_head.weight outside its forward
        two, state_two = _trajectory(ray_session, args + [f"trainer.zero_stage={stage}"], tiny_model_dir, batch, 2)
        assert one[0] != one[-1]  # it trained
        for a, b in zip(one, two):
            assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (stage, one, two)
        assert state_two.keys() == state_one.keys()
        assert all(torch.allclose(state_two[k], v, atol=1e-4) for k, v in state_one.items())
