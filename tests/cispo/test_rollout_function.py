"""A rollout function in the user's own module, named by `rollout.function`: it calls the engine twice and
splices in a tool's output that must not train; the batch masks those tokens, so they get no gradient."""
import math
from contextlib import closing

import pytest
import torch

from cispo.batching import rl_batch
from cispo.collect import Collector, Group
from cispo.config import RecipeError, load_recipe
from cispo.data import Prompt, PromptSource
from cispo.loop import train
from cispo.loss import policy_loss
from cispo.metrics import Timer, read_metrics
from cispo.run import RunDir
from rewards.pool import ScoringPool
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import load_model
from rollout.trajectory import RolloutInput, SamplingParams, single_turn
from tests.cispo.user_rollouts import TOOL_OUTPUT, with_tool_output
from tests.conftest import REPO

RECIPE = REPO / "recipes/tiny-arith.yaml"
FUNCTION = "rollout.function=tests.cispo.user_rollouts:with_tool_output"


def _batch(tiny_model_dir, tok, fn, n=4):
    """rl_batch of `fn`'s trajectories for three prompts, rewarded by response length (spread in every group)."""
    engine = CispoEngine(load_model(tiny_model_dir), RolloutConfig(), tok.pad_token_id, tok)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, stop_token_ids=(tok.eos_token_id,))
    prompts = [Prompt(f"{a}+{b}=", str(a + b)) for a, b in [(1, 2), (13, 4), (7, 70)]]
    inputs = [RolloutInput(p.text, tok(p.text)["input_ids"], params, seed=i, n=n) for i, p in enumerate(prompts)]
    groups = [Group(p, ts) for p, ts in zip(prompts, fn(inputs, engine))]
    for g in groups:
        for i, t in enumerate(g.trajectories):
            t.reward, t.status = float(i), "ok"
    recipe = load_recipe(RECIPE, [])
    return rl_batch(groups, recipe.algorithm, max_new_tokens=10, filler_id=tok.eos_token_id), groups


def test_the_default_function_trains_every_sampled_token(tiny_model_dir, tiny_tokenizer):
    batch, groups = _batch(tiny_model_dir, tiny_tokenizer, single_turn)
    assert int(batch.loss_mask.sum()) == sum(len(t.response_ids) for g in groups for t in g.trajectories)
    assert set(batch.versions[batch.loss_mask.bool()].tolist()) == {0}  # the starting weights sampled them


def test_tokens_the_policy_did_not_sample_get_no_gradient(tiny_model_dir, tiny_tokenizer):
    batch, groups = _batch(tiny_model_dir, tiny_tokenizer, with_tool_output)
    tool = torch.zeros_like(batch.loss_mask, dtype=torch.bool)  # where the tool's output is each row's target
    for i, t in enumerate(t for g in groups for t in g.trajectories):
        start = len(t.prompt_ids) - 1 + t.loss_mask.index(0)
        assert t.response_ids[t.loss_mask.index(0):][:len(TOOL_OUTPUT)] == TOOL_OUTPUT
        assert batch.input_ids[i, start + 1:start + 1 + len(TOOL_OUTPUT)].tolist() == TOOL_OUTPUT
        tool[i, start:start + len(TOOL_OUTPUT)] = True
        assert len(t.response_ids) > len(TOOL_OUTPUT) + 1  # a second turn followed the tool's output
    assert not batch.loss_mask[tool].any() and (batch.versions[tool] == -1).all()
    assert (batch.old_logprobs[tool] == 0).all()

    a = load_recipe(RECIPE, []).algorithm
    # The trainer's logprobs as a leaf: the gradient the loss sends back into the model, per token.
    torch.manual_seed(0)
    logprobs = (batch.old_logprobs + 0.1 * torch.randn_like(batch.old_logprobs)).requires_grad_()
    loss = policy_loss(a.name, logprobs, batch.old_logprobs, batch.advantages, batch.loss_mask, eps_high=a.eps_high,
                       eps_low=a.eps_low, normalization=a.normalization, group_index=batch.group_index)
    loss.backward()
    assert (logprobs.grad[tool] == 0).all()
    trained = batch.loss_mask.bool() & (batch.advantages != 0).unsqueeze(1)
    assert trained.sum() > 0 and (logprobs.grad[trained] != 0).all()


def test_pending_steps_queue_in_order_and_give_what_a_step_alone_gives(tiny_model_dir, tiny_tokenizer):
    """Two steps submitted back to back (as an asynchronous loop would) collect what each gives alone."""
    recipe = load_recipe(RECIPE, ["data.eval_size=4", "data.prompts_per_step=2", "rollout.n_samples=2",
                                  "algorithm.dynamic_sampling=false", "reward.num_workers=1"])
    engine = CispoEngine(load_model(tiny_model_dir), RolloutConfig(), tiny_tokenizer.pad_token_id, tiny_tokenizer)
    source = PromptSource(recipe.data, recipe.run.seed)
    view = lambda groups: [(g.prompt.text, t.response_ids, t.reward) for g in groups for t in g.trajectories]
    with ScoringPool(1, 10.0) as scorer, closing(Collector(recipe, tiny_tokenizer, engine, scorer)) as collector:
        pending = [collector.submit(step, source, 6, Timer()) for step in (1, 2)]
        queued = [view(p.result()[1]) for p in pending]
        alone = [view(collector.submit(step, source, 6, Timer()).result()[1]) for step in (2, 1)][::-1]
    assert queued == alone and queued[0] != queued[1]


def test_a_rollout_function_that_cannot_load_is_one_line_naming_the_key(tmp_path):
    """Refused when the run directory is opened, before a model is built or Ray started."""
    for value, why in [("tests.cispo.user_rollouts:missing", "has no 'missing'"),
                       ("no_such_module:fn", "cannot be imported"), ("single_turn", "expected 'module:function'")]:
        recipe = load_recipe(RECIPE, [f"rollout.function={value}", f"run.dir={tmp_path / 'run'}"])
        with pytest.raises(RecipeError) as err:
            RunDir(recipe)
        assert str(err.value).startswith(f"command line: key 'rollout.function' = '{value}': ")
        assert why in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "run").exists()
    assert load_recipe(RECIPE, [FUNCTION]).rollout_function() is with_tool_output


def test_a_rollout_function_that_returns_too_few_trajectories_is_named(tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    recipe = load_recipe(RECIPE, ["rollout.function=tests.cispo.user_rollouts:drops_a_sample"])
    engine = CispoEngine(load_model(tiny_model_dir), RolloutConfig(), tok.pad_token_id, tok)
    collector = Collector(recipe, tok, engine, None)
    with pytest.raises(ValueError, match=r"^rollout function 'tests.cispo.user_rollouts:drops_a_sample' returned "
                                         r"\[2, 3\] trajectories for 2 prompts of 3 samples each$"):
        collector.collect([Prompt("1+2=", "3"), Prompt("4+5=", "9")], [0, 1], collector.sampling(max_new_tokens=4), 3)


@pytest.mark.slow  # 125 s on 2 shared cores
def test_a_user_rollout_function_trains_through_a_recipe(ray_session, tmp_path):
    train(load_recipe(RECIPE, [
        FUNCTION, "reward.name=tests.rewards.user_rewards:trl_length", "algorithm.dynamic_sampling=false",
        "sft.steps=0", "data.eval_size=4", "data.prompts_per_step=4", "rollout.n_samples=4",
        "run.max_steps=2", "run.threads=1", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"]))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["response_length_mean"] > len(TOOL_OUTPUT) + 1 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
        # The tool's tokens have no rollout logprob (0): had they trained, their IS weight π/1 would pull
        # the mean far below 1 and the KL estimate far above 0 on these near-on-policy updates.
        assert abs(r["is_weight_mean"] - 1) < 0.01 and r["approx_kl"] < 1e-3
