"""OpenEnv environments (cispo.env.OpenEnvText), written as openenv-core's documentation shows, played in-process
as multi-turn episodes: their rewards and observations reach the episode, only sampled tokens train with
logprobs that match a teacher-forced forward. Their 3 RL steps through a recipe and their failures as counted
outcomes are tested in tests/cispo/test_multiturn.py, beside the Gymnasium environment's."""

import pytest
import torch

from cispo.collect import Collector, Group, rollout_metrics
from cispo.config import RecipeError
from cispo.env import EnvError, Task, load_env
from cispo.multiturn import Episodes
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import load_model, load_tokenizer
from rollout.trajectory import SamplingParams
from tests.cispo import test_multiturn
from tests.cispo.test_multiturn import _inputs, _recipe, _segments
from tests.rollout.reference import teacher_forced

ENV = "env.name=tests.cispo.user_openenv:"
chat_model_dir = test_multiturn.chat_model_dir  # the tiny ChatML model, built once per module


def test_an_openenv_environment_reads_and_writes_text_through_its_typed_models():
    env = load_env("tests.cispo.user_openenv:GuessEnvironment")(7)
    assert env.reset(Task("1+2=", "3", "arith", {"level": 1})) == [{"role": "user", "content": "Guess 1+2="}]
    assert env.env.state.episode_id == "cispo-7"
    assert env.step("four") == (("Try again.", 0.0, False))
    assert env.step("maybe 4") == (("Try again.", 0.1, False))
    assert env.step("it is 3") == ((None, 1.0, True)) and env.env.state.step_count == 3
    with pytest.raises(EnvError, match="step returned a str; an OpenEnv environment returns an Observation"):
        load_env("tests.cispo.user_openenv:StepReturnsText")(0).step("3")


def test_an_openenv_episode_keeps_the_sampled_tokens_and_only_they_train(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    model = load_model(chat_model_dir)
    recipe = _recipe(chat_model_dir, f"{ENV}GuessEnvironment", "env.max_turns=3", "env.max_turn_tokens=8")
    engine = CispoEngine(model, RolloutConfig(), tok.pad_token_id, tok)
    inputs, prompts = _inputs(tok, SamplingParams(max_new_tokens=200, temperature=1.0), n=2)
    out = Episodes(recipe, tok)(inputs, engine)
    for x, group in zip(inputs, out):
        for t in group:
            assert t.status == "ok" and tok.decode(t.prompt_ids).startswith(f"<|im_start|>user\nGuess {x.text}<|im_end|>")
            runs = _segments(t)
            turns = [tok.decode(ids).removesuffix("<|im_end|>") for m, ids in runs if m]
            right = [x.answer in text for text in turns]
            # The observations' rewards summed: 0.1 per wrong guess with a digit, 1 for the right one, which ends it.
            assert t.reward == pytest.approx(sum(1.0 if r else 0.1 * any(c.isdigit() for c in s)
                                                 for r, s in zip(right, turns)))
            assert t.outcomes["end_done" if any(right) else "end_max_turns"] == 1
            for m, ids in runs:
                assert m or "<|im_start|>user\nTry again.<|im_end|>" in tok.decode(ids)
            forced = teacher_forced(model, t.prompt_ids, t.response_ids)
            trained = torch.tensor(t.loss_mask, dtype=torch.bool)
            assert trained.any() and (forced[trained] - torch.tensor(t.logprobs)[trained]).abs().max() <= 1e-4
            assert all(v == -1 for v, m in zip(t.versions, t.loss_mask) if not m)
    assert rollout_metrics([Group(p, ts) for p, ts in zip(prompts, out)])["episode_turns"] >= 4


def test_an_openenv_action_the_model_cannot_write_is_refused_when_the_recipe_loads(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    with pytest.raises(RecipeError) as err:
        Collector(_recipe(chat_model_dir, f"{ENV}GridEnvironment"), tok, None, None)
    assert str(err.value) == ("command line: key 'env.name' = 'tests.cispo.user_openenv:GridEnvironment': "
                              "TwoFieldAction has required fields ['row', 'col']; a text action has exactly one, "
                              "which the model's turn fills")
