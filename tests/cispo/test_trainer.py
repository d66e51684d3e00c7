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
