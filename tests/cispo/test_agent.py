"""Agent mode (cispo.agent): a user's agent function talks to the policy through the `openai` client; every
call is recorded as exact tokens, only sampled tokens train, their logprobs match a teacher-forced forward, and
each bad input is a counted outcome."""
import logging
import math
from itertools import accumulate

import pytest
import torch

from cispo.agent import Agents
from cispo.batching import rl_batch
from cispo.collect import Collector, Group, rollout_metrics
from cispo.config import RecipeError
from cispo.loop import train
from cispo.metrics import read_metrics
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import load_model, load_tokenizer
from rollout.trajectory import SamplingParams
from tests.cispo import user_agents
from tests.cispo import test_multiturn
from tests.cispo.test_multiturn import RECIPE, Recorder, Scripted, _inputs, _recipe, _segments
from tests.rollout.reference import teacher_forced

AGENT = "rollout.function=cispo.agent:Agents"
chat_model_dir = test_multiturn.chat_model_dir  # the tiny ChatML model, built once per module


def test_each_call_is_recorded_as_the_sampled_tokens_and_only_they_train(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    model = load_model(chat_model_dir)
    recipe = _recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:guess")
    engine = Recorder(CispoEngine(model, RolloutConfig(), tok.pad_token_id, tok))
    inputs, prompts = _inputs(tok, SamplingParams(max_new_tokens=200, temperature=1.0), n=2)
    out = Agents(recipe, tok)(inputs, engine)
    for x, group in zip(inputs, out):
        for t in group:
            assert t.status == "ok" and t.outcomes["end_done"] == 1
            assert tok.decode(t.prompt_ids) == f"<|im_start|>user\nGuess {x.text}<|im_end|>\n<|im_start|>assistant\n"
            runs = _segments(t)
            turns = [tok.decode(ids).removesuffix("<|im_end|>") for m, ids in runs if m]
            # The agent's own reward, from the text it read: a right guess ends it, else two tries.
            right = [x.answer in text for text in turns]
            assert t.reward == (1.0 if any(right) else max(0.1 * any(c.isdigit() for c in s) for s in turns))
            assert [m for m, _ in runs] == ([1] if right[0] else [1, 0, 1]) and t.outcomes["turns"] == len(turns)
            assert t.outcomes["state_kept"] == len(turns) - 1 and t.outcomes["state_reprefill"] == 0
            starts = [0, *accumulate(len(ids) for _, ids in runs)]
            for (m, ids), pos in zip(runs, starts):
                before = t.prompt_ids + t.response_ids[:pos]
                # Sampled: exactly what one engine call returned for the record's tokens before it.
                # Inserted: the template's closing of the turn and the agent's next message, untrained.
                assert (sum(p == before and s == ids for p, s, _ in engine.turns) == 1 and len(ids) <= 6) if m else \
                    tok.decode(ids).endswith("\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n")
            assert all(lp == 0.0 and v == -1 for lp, v, m in zip(t.logprobs, t.versions, t.loss_mask) if not m)
            forced = teacher_forced(model, t.prompt_ids, t.response_ids)
            trained = torch.tensor(t.loss_mask, dtype=torch.bool)
            assert (forced[trained] - torch.tensor(t.logprobs)[trained]).abs().max() <= 1e-4
    groups = [Group(p, ts) for p, ts in zip(prompts, out)]
    assert rollout_metrics(groups)["episode_end_done"] == 4
    batch = rl_batch(groups, recipe.algorithm, max_new_tokens=200, filler_id=tok.eos_token_id)
    assert int(batch.loss_mask.sum()) == sum(sum(t.loss_mask) for ts in out for t in ts)


def test_an_edited_history_is_refused_naming_the_message_and_a_later_call_goes_on(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:edits_history")
    engine = CispoEngine(load_model(chat_model_dir), RolloutConfig(), tok.pad_token_id, tok)
    inputs, _ = _inputs(tok, SamplingParams(max_new_tokens=200), n=1)
    user_agents.REFUSALS.clear()
    out = Agents(recipe, tok)(inputs, engine)
    assert user_agents.REFUSALS == ["messages[1] differs from what the previous call sent and got back: a call "
                                    "resends the conversation unchanged, then adds messages"] * 2
    for t in (t for ts in out for t in ts):
        assert t.status == "ok" and t.reward == 0.5 and t.outcomes["refused_prefix"] == 1
        assert t.outcomes["turns"] == 2 and [m for m, _ in _segments(t)] == [1, 0, 1]


def test_requests_it_cannot_serve_are_refused_and_counted(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:asks_badly")
    inputs, _ = _inputs(tok, SamplingParams(max_new_tokens=200), n=1)
    user_agents.REFUSALS.clear()
    t = Agents(recipe, tok)(inputs[:1], Scripted(tok, ["It is 3."] * 4))[0][0]
    assert [m.split(" ")[0] for m in user_agents.REFUSALS] == ["stream=True", "n=2", "tools=[{'type':",
                                                                "max_tokens=0", "messages[0]"]
    assert t.status == "ok" and t.outcomes["refused_request"] == 5 and t.outcomes["turns"] == 1


@pytest.mark.parametrize("override, budget, refused", [("env.max_turns=1", 200, "max_turns"),
                                                       ("env.max_turns=4", 12, "token_budget")])
def test_a_call_past_the_episode_budgets_is_refused_and_counted(chat_model_dir, caplog, override, budget, refused):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:guess", override)
    inputs, _ = _inputs(tok, SamplingParams(max_new_tokens=budget), n=1)
    with caplog.at_level(logging.WARNING, logger="cispo.agent"):  # "It is 3." does not guess 13+4: a second call
        t = Agents(recipe, tok)(inputs[1:], Scripted(tok, ["It is 3."] * 2))[0][0]
    assert t.outcomes[f"refused_{refused}"] == 1 and t.outcomes["turns"] == 1 and t.outcomes["end_agent_error"] == 1
    assert {"max_turns": "the episode has made its env.max_turns=1 calls",
            "token_budget": "the episode's token budget (rollout.max_new_tokens=12) is spent"}[refused] in caplog.text


@pytest.mark.parametrize("agent, says", [
    ("raises", "agent 'tests.cispo.user_agents:raises' failed, episode ended: RuntimeError: the agent's tool server"),
    ("returns_text", "TypeError: returned 'correct'; an agent returns its episode's reward, a finite number"),
    ("never_calls", "RuntimeError: made no call to base_url; there is nothing to train")])
def test_an_agent_that_fails_ends_its_episode_counted_and_the_run_goes_on(chat_model_dir, caplog, agent, says):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, AGENT, f"env.agent=tests.cispo.user_agents:{agent}")
    inputs, prompts = _inputs(tok, SamplingParams(max_new_tokens=100), n=2)
    with caplog.at_level(logging.WARNING, logger="cispo.agent"):
        out = Agents(recipe, tok)(inputs, Scripted(tok, ["It is 3."] * 4))
    assert says in caplog.text
    groups = [Group(p, ts) for p, ts in zip(prompts, out)]
    assert all(t.status == "env_error" for ts in out for t in ts)
    assert rollout_metrics(groups)["episode_end_agent_error"] == 4
    assert rl_batch(groups, recipe.algorithm, max_new_tokens=100, filler_id=tok.eos_token_id).loss_mask.sum() == 0


def test_an_agent_that_cannot_load_is_one_line_naming_the_key(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    for override, where, why in [("env.agent=tests.cispo.user_agents:nothing", "command line", "has no 'nothing'"),
                                 ("env.max_turns=2", str(RECIPE), "set key 'env.agent' to 'module:function'")]:
        with pytest.raises(RecipeError) as err:
            Collector(_recipe(chat_model_dir, AGENT, override), tok, None, None)
        assert str(err.value).startswith(f"{where}: ") and why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # 47 s on this 2-core machine at load average 18; 381 s at 35, with a first DeepSpeed op build
def test_an_openai_client_agent_trains_through_a_recipe(ray_session, chat_model_dir, tmp_path):
    train(_recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:guess", "rollout.max_new_tokens=48",
                  "algorithm.dynamic_sampling=false", "sft.steps=0", "data.eval_size=4", "data.prompts_per_step=4",
                  "rollout.n_samples=4", "run.max_steps=2", "run.threads=1", "wandb.mode=disabled",
                  f"run.dir={tmp_path / 'run'}"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]  # step 2 samples from the weights step 1 trained and published
    for r in rows:
        assert r["episode_end_done"] == 16 and r["episode_turns"] >= 16
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["reward_mean"] > 0
        # Inserted tokens have no rollout logprob: had they trained, the IS weight would sit far from 1.
        assert abs(r["is_weight_mean"] - 1) < 0.01 and r["approx_kl"] < 1e-3


class Broken:
    def generate(self, requests):
        raise RuntimeError("rollout worker 0 died")


def test_an_engine_failure_ends_the_collection_and_leaves_no_agent_waiting(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    agents = Agents(_recipe(chat_model_dir, AGENT, "env.agent=tests.cispo.user_agents:guess"), tok)
    inputs, _ = _inputs(tok, SamplingParams(max_new_tokens=100), n=2)
    with pytest.raises(RuntimeError, match="rollout worker 0 died"):
        agents(inputs, Broken())
    assert agents.running == 0 and not agents.pending and not agents.sessions
