"""Reward functions written for TRL and verl, set in a recipe and run by the controller's collection path
(a real rollout worker, a real scoring pool), score what they score when called directly as TRL and verl
call them; a reward that returns NaN is a counted error scoring 0 (issue 12, classes 5 and 7)."""
import json
import math

import pytest
import torch

from cispo.advantages import advantages
from cispo.batching import rl_batch
from cispo.collect import Collector, rollout_metrics
from cispo.config import load_recipe
from cispo.data import PromptSource, read_rows
from cispo.metrics import Timer
from rewards.pool import ScoringPool
from rollout.config import RolloutConfig
from rollout.model import load_tokenizer
from rollout.worker import RolloutPool
from tests.conftest import REPO
from tests.rewards import user_rewards

MOD = "tests.rewards.user_rewards"
# Prompts of different lengths and columns that differ per row, so a wrong row, column or order would show.
ROWS = [{"prompt": p, "answer": a, "solution": a, "difficulty": d, "extra_info": {"split": "train", "weight": d}}
        for p, a, d in [("1+2=", "3", 1.0), ("12+30=", "42", 2.0), ("5+=", "5", 0.5), ("9+9+9=", "27", 3.0)]]
N = 3


@pytest.fixture(scope="module")
def rollout(ray_session, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    pool = RolloutPool.start(1, str(tiny_model_dir), tok.pad_token_id, RolloutConfig(threads=1, max_batch_rows=4))
    try:
        yield tok, pool
    finally:
        pool.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipe-rewards") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def recipe_for(data, reward: str):
    return load_recipe(REPO / "recipes/tiny-arith.yaml", [
        f"data.sources=[{{name: gsm8k, format: jsonl, path: {data}}}]", f"reward.name={reward}",
        f"rollout.n_samples={N}", "rollout.max_new_tokens=10", "wandb.mode=disabled"])


def collect(rollout, data, reward: str):
    """The recipe's groups for every row, N samples each, scored by `reward` set as reward.name."""
    tok, pool = rollout
    recipe = recipe_for(data, reward)
    prompts, _ = read_rows(data, "jsonl", source="gsm8k")
    with ScoringPool(num_workers=2, timeout_s=30.0) as scorer:
        collector = Collector(recipe, tok, pool, scorer)
        groups = collector.collect(prompts, list(range(len(prompts))), collector.sampling(temperature=1.0), N)
    texts = [tok.decode(c.response_ids, skip_special_tokens=True) for g in groups for c in g.trajectories]
    return groups, texts


@pytest.mark.parametrize("name", ["trl_ids", "trl_weighted_length", "trl_length", "compute_score",
                                  "compute_score_kwonly"])
def test_trl_and_verl_functions_in_a_recipe_score_as_called_directly(rollout, data, name):
    groups, texts = collect(rollout, data, f"{MOD}:{name}")
    rows = [ROWS[i] for i in range(len(ROWS)) for _ in range(N)]
    ids = [list(c.response_ids) for g in groups for c in g.trajectories]
    fn = getattr(user_rewards, name)
    if name.startswith("trl"):  # as TRL's GRPOTrainer calls it: keywords, every dataset column as a list
        columns = {k: [r[k] for r in rows] for k in ROWS[0] if k != "prompt"}
        direct = fn(prompts=[r["prompt"] for r in rows], completions=texts, completion_ids=ids,
                    trainer_state=None, **columns)
    else:  # as verl's reward manager calls it, with the data source's name and the row's extra_info
        direct = [fn(data_source="gsm8k", solution_str=t, ground_truth=r["answer"], extra_info=r["extra_info"])
                  for t, r in zip(texts, rows)]
        direct = [d["score"] if isinstance(d, dict) else d for d in direct]
    assert [c.status for g in groups for c in g.trajectories] == ["ok"] * len(texts)
    assert torch.cat([g.rewards for g in groups]).tolist() == pytest.approx(direct)
    if name.startswith("trl"):  # these differ between rows whatever the random model wrote
        assert len(set(direct)) > 1
    else:  # the random model's text rarely holds the answer: compute_score's 0.5 bonus is then what
        # shows that verl's function got the source's name and the row's extra_info, not "" and None
        assert name == "compute_score_kwonly" or min(direct) >= 0.5


def test_a_nan_reward_in_a_recipe_is_a_counted_error_scoring_0(rollout, data):
    groups, _ = collect(rollout, data, f"{MOD}:nan_on_odd_length")
    odd = [(len(g.prompt.text) + len(c.response_ids)) % 2 == 1 for g in groups for c in g.trajectories]
    assert 0 < sum(odd) < len(odd)
    assert [c.status for g in groups for c in g.trajectories] == ["error" if o else "ok" for o in odd]
    rewards = torch.cat([g.rewards for g in groups])
    assert rewards.tolist() == [0.0 if o else 1.0 for o in odd]
    assert rollout_metrics(groups)["reward_error"] == sum(odd)  # what the loop logs for the step
    group = torch.arange(len(groups)).repeat_interleave(N)
    assert all(math.isfinite(a) for a in advantages(rewards, group, "group_std").tolist())


def test_a_sandbox_failure_leaves_its_group_uniform_so_dynamic_sampling_drops_it(rollout, data):
    """verl PR #6375, through the training step: every real outcome scores 1 and the harness fails on some
    responses. Before, each group with a failure had a spread ([1, 1, 0]) and was trained on; now every
    group is uniform, so dynamic sampling drops them all and the advantages are all 0."""
    tok, pool = rollout
    recipe = recipe_for(data, f"{MOD}:sandbox_fails_on_odd_length")
    with ScoringPool(num_workers=2, timeout_s=30.0) as scorer:
        collector = Collector(recipe, tok, pool, scorer)
        first, kept, counts = collector.submit(1, PromptSource(recipe.data, 0), 10, Timer()).result()
        collector.close()
    statuses = [t.status for g in first for t in g.trajectories]
    assert any({t.status for t in g.trajectories} == {"ok", "sandbox_error"} for g in first)  # a spread it gave
    assert kept == [] and counts["groups_dropped"] >= len(first)
    assert rollout_metrics(first)["zero_spread_groups"] == len(first)
    batch = rl_batch(first, recipe.algorithm, 10, tok.eos_token_id)
    assert torch.equal(batch.advantages, torch.zeros(len(statuses)))
    failed = torch.tensor([s == "sandbox_error" for s in statuses])
    assert batch.loss_mask[failed].sum() == 0 and (batch.loss_mask[~failed].sum(1) > 0).all()
