"""Multi-turn episodes (cispo.multiturn): exact tokens across turns, masks, logprobs against a teacher-forced
forward, budgets, tools in the sandbox, and each bad input a counted outcome, with a tiny model whose
tokenizer speaks ChatML."""
import logging
import math
import string

import pytest
import torch

from cispo.batching import rl_batch
from cispo.collect import Collector, Group, rollout_metrics
from cispo.config import RecipeError, load_recipe
from cispo.data import Prompt
from cispo.loop import train
from cispo.metrics import read_metrics
from cispo.multiturn import ChatTemplate, Episodes, tool_calls
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine
from rollout.model import CHATML, build_char_tokenizer, load_model, load_tokenizer
from rollout.trajectory import RolloutInput, SamplingParams, Trajectory
from tests.conftest import M1_TWO_LAYERS, REPO, save_tiny_model
from tests.rollout.reference import teacher_forced

RECIPE = REPO / "recipes/tiny-arith.yaml"
# Like Qwen3's: an assistant turn before the last user message loses its <think> part, so adding a user
# message re-renders an earlier turn.
DROPS_THINKING = (
    "{% set ns = namespace(last=0) %}{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}{% set c = m['content'] %}"
    "{% if m['role'] == 'assistant' and loop.index0 < ns.last and '</think>' in c %}"
    "{% set c = c.split('</think>')[-1] %}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + c + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TURN_MARKERS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A random tiny hybrid model whose character tokenizer has ChatML's turn markers as special tokens."""
    tok = build_char_tokenizer(string.digits + string.ascii_letters + string.punctuation + " \n")
    tok.add_special_tokens({"additional_special_tokens": TURN_MARKERS})
    tok.chat_template = CHATML
    return save_tiny_model(tok, tmp_path_factory.mktemp("chat-model"), **M1_TWO_LAYERS)


def _recipe(model_dir, *overrides):
    return load_recipe(RECIPE, [f"model.path={model_dir}", "model.chat_template=true",
                                "rollout.function=cispo.multiturn:Episodes", *overrides])


def _inputs(tok, params, n=3):
    prompts = [Prompt(f"{a}+{b}=", str(a + b), source="arith") for a, b in [(1, 2), (13, 4)]]
    return [RolloutInput(p.text, tok(p.text)["input_ids"], params, seed=i, n=n, answer=p.answer, source=p.source)
            for i, p in enumerate(prompts)], prompts


class Recorder:
    """The real engine, with what each of its calls sampled kept aside (the trajectories it returns are
    extended in place by later turns)."""

    def __init__(self, engine):
        self.engine, self.turns = engine, []

    def generate(self, requests):
        out = self.engine.generate(requests)
        self.turns += [(r.prompt_ids, list(t.response_ids), list(t.logprobs)) for r, t in zip(requests, out)]
        return out


def _segments(t: Trajectory):
    """The trajectory's response as runs of equal loss mask: [(mask, ids)]."""
    runs = []
    for token, m in zip(t.response_ids, t.loss_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(token)
        else:
            runs.append((m, [token]))
    return runs


def test_a_template_that_only_appends_passes_and_one_that_rewrites_turns_is_refused_by_name(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    template = ChatTemplate(tok, tool_role=True)
    assert tok.convert_ids_to_tokens(template.end) == ["<|im_end|>", "\n"]
    tok.chat_template = DROPS_THINKING
    with pytest.raises(ValueError) as err:
        ChatTemplate(tok, tool_role=True)
    assert str(err.value).startswith(f"the chat template of tokenizer {str(chat_model_dir)!r} breaks the prefix "
                                      f"property") and "\n" not in str(err.value)
    recipe = _recipe(chat_model_dir, "env.name=tests.cispo.user_envs:GuessGym")
    with pytest.raises(RecipeError, match="breaks the prefix property"):
        Collector(recipe, tok, None, None)
    tok.chat_template = None
    with pytest.raises(RecipeError, match="need model.chat_template=true and a tokenizer with a chat template"):
        Collector(recipe, tok, None, None)


def test_turns_keep_the_sampled_tokens_and_only_they_train(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    model = load_model(chat_model_dir)
    recipe = _recipe(chat_model_dir, "env.name=tests.cispo.user_envs:GuessGym", "env.max_turns=3",
                     "env.max_turn_tokens=8")
    engine = Recorder(CispoEngine(model, RolloutConfig(), tok.pad_token_id, tok))
    params = SamplingParams(max_new_tokens=200, temperature=1.0)
    inputs, prompts = _inputs(tok, params, n=2)
    out = Episodes(recipe, tok)(inputs, engine)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for x, group in zip(inputs, out):
        for t in group:
            assert t.status == "ok" and t.outcomes["turns"] == 3 and t.outcomes["end_max_turns"] == 1
            # Turns 2 and 3 prefilled only their new tokens, from the state the engine kept.
            assert t.outcomes["state_kept"] == 2 and t.outcomes["state_reprefill"] == 0
            assert tok.decode(t.prompt_ids) == f"<|im_start|>user\nGuess {x.text}<|im_end|>\n<|im_start|>assistant\n"
            # The response is each turn's sampled ids, as the engine returned them, between inserted ids.
            runs = _segments(t)
            assert [m for m, _ in runs] == [1, 0, 1, 0, 1]
            pos = 0
            for m, ids in runs:
                if m:
                    turn = [s for p, s, _ in engine.turns if p == t.prompt_ids + t.response_ids[:pos] and s == ids]
                    assert len(turn) == 1
                else:  # the template's end of the model's turn, then the environment's reply
                    closed = "" if t.response_ids[pos - 1] == end else "<|im_end|>"
                    assert tok.decode(ids) == f"{closed}\n<|im_start|>user\nTry again.<|im_end|>\n<|im_start|>assistant\n"
                    assert t.logprobs[pos:pos + len(ids)] == [0.0] * len(ids)
                    assert t.versions[pos:pos + len(ids)] == [-1] * len(ids)
                pos += len(ids)
            # π_old of every sampled token is the model's own, through a teacher-forced forward of it all.
            forced = teacher_forced(model, t.prompt_ids, t.response_ids)
            trained = torch.tensor(t.loss_mask, dtype=torch.bool)
            assert (forced[trained] - torch.tensor(t.logprobs)[trained]).abs().max() <= 1e-4
    groups = [Group(p, ts) for p, ts in zip(prompts, out)]
    metrics = rollout_metrics(groups)
    assert metrics["episode_end_max_turns"] == 4 and metrics["episode_turns"] == 12
    batch = rl_batch(groups, recipe.algorithm, max_new_tokens=200, filler_id=tok.eos_token_id)
    assert int(batch.loss_mask.sum()) == sum(sum(t.loss_mask) for ts in out for t in ts)


def test_the_episode_token_budget_ends_an_episode_and_is_counted(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, "env.name=tests.cispo.user_envs:GuessGym", "env.max_turns=4",
                     "env.max_turn_tokens=8")
    engine = CispoEngine(load_model(chat_model_dir), RolloutConfig(), tok.pad_token_id, tok)
    inputs, prompts = _inputs(tok, SamplingParams(max_new_tokens=30, temperature=1.0))
    out = Episodes(recipe, tok)(inputs, engine)
    for t in (t for ts in out for t in ts):
        assert t.outcomes["end_token_budget"] == 1 and len(t.response_ids) <= 30
    assert rollout_metrics([Group(p, ts) for p, ts in zip(prompts, out)])["episode_end_token_budget"] == 6


class Scripted:
    """Stands in for the model's choices only: turn k of every episode is `turns[k]`'s tokens, closed by
    <|im_end|> (a random tiny model never writes a tool call). Template, tools, sandbox and environment are real."""

    def __init__(self, tok, turns):
        self.tok, self.turns, self.calls = tok, turns, 0

    def generate(self, requests):
        ids = self.tok.encode(self.turns[self.calls], add_special_tokens=False) + \
            [self.tok.convert_tokens_to_ids("<|im_end|>")]
        self.calls += 1
        return [Trajectory.sampled(r.prompt_ids, ids, [-1.0] * len(ids), "stop", 0) for r in requests]


def _call(name, **arguments):
    import json
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


BAD_TURNS = [("<tool_call>{\"name\": \"python\"</tool_call>", "malformed", "error: a tool call is not JSON"),
             (_call("browser", url="x"), "unknown", "error: unknown tool 'browser'; tools: python"),
             (_call("python", code="raise ValueError('boom')"), "error", "ValueError: boom"),
             (_call("python", code="while True: pass"), "timeout", "error: the tool ran past its 1 s limit"),
             (_call("python", code="print('x' * 10_000_000)"), "error", "[output cut: "),
             (_call("python", code="print(6 * 7)"), "ok", "42\n")]


SHELL_TURNS = [(_call("shell", command="echo $((6 * 7)); cat"), "ok", "42\n"),
               (_call("shell", command="echo oops >&2; exit 3"), "error", "oops\nerror: exit code 3"),
               (_call("shell", cmd="ls"), "malformed", 'error: the shell tool takes {"command": str}'),
               (_call("shell", command="while :; do :; done"), "timeout", "error: the tool ran past its 1 s limit"),
               (_call("shell", command="yes | head -c 10000000"), "error", "[output cut: "),
               (_call("python", code="print(1)"), "unknown", "error: unknown tool 'python'; tools: shell")]


@pytest.mark.parametrize("tool, turns", [("python", BAD_TURNS), ("shell", SHELL_TURNS)])
def test_bad_tool_calls_are_observations_for_the_model_and_counted(chat_model_dir, tool, turns):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, "env.name=tests.cispo.user_envs:Calculator", f"env.tools=[{tool}]",
                     "env.max_turns=8", "env.tool_timeout_s=1", "env.max_observation_chars=300")
    inputs, _ = _inputs(tok, SamplingParams(max_new_tokens=4000), n=1)
    inputs[0].answer = "42"
    out = Episodes(recipe, tok)(inputs[:1], Scripted(tok, [text for text, _, _ in turns] + ["It is 42."]))
    t = out[0][0]
    assert t.status == "ok" and t.reward == 1.0 and t.outcomes["end_done"] == 1 and t.outcomes["turns"] == 7
    replies = [tok.decode(ids) for m, ids in _segments(t) if not m]
    for reply, (_, _, says) in zip(replies, turns, strict=True):
        assert reply.startswith("\n<|im_start|>tool\n") and says in reply, (reply, says)
    assert max(map(len, replies)) < 400  # 10 MB printed, 300 characters and a note shown
    expected = {o: sum(outcome == o for _, outcome, _ in turns) for o in ("malformed", "unknown", "error", "timeout",
                                                                          "ok", "sandbox_error")}
    assert {k: t.outcomes[f"tool_{k}"] for k in expected} == expected and t.outcomes["tool_truncated"] == 1


def test_tool_calls_are_parsed_or_refused_with_a_reason():
    assert tool_calls('a <tool_call>{"name": "python", "arguments": {"code": "1"}}</tool_call> b') == \
        [("python", {"code": "1"})]
    for text, why in [("<tool_call>{}", "not closed"), ("<tool_call>[1]</tool_call>", '{"name": str'),
                      ('<tool_call>{"name": 1, "arguments": {}}</tool_call>', '{"name": str')]:
        with pytest.raises(ValueError, match=why.replace("[", r"\[")):
            tool_calls(text)


@pytest.mark.parametrize("env, says, turns", [
    ("RaisesInReset", "raised in reset, episode ended: RuntimeError: the task server is down", 0),
    ("RaisesInStep", "raised in step, episode ended: KeyError", 1),
    ("StepReturnsADict", "StepReturnsADict.step returned a dict; expected Step(", 1),
    ("user_openenv:RaisesInReset", "raised in reset, episode ended: ConnectionError: the task store is unreachable", 0),
    ("user_openenv:RaisesInStep", "raised in step, episode ended: ValueError: the board is corrupt", 1),
    ("user_openenv:StepReturnsText", "step returned a str; an OpenEnv environment returns an Observation", 1)])
def test_an_environment_that_fails_ends_its_episode_counted_and_the_run_goes_on(chat_model_dir, caplog, env, says,
                                                                                turns):
    tok = load_tokenizer(chat_model_dir)
    recipe = _recipe(chat_model_dir, f"env.name=tests.cispo.{env if ':' in env else 'user_envs:' + env}")
    inputs, prompts = _inputs(tok, SamplingParams(max_new_tokens=100), n=2)
    with caplog.at_level(logging.WARNING, logger="cispo.multiturn"):
        out = Episodes(recipe, tok)(inputs, Scripted(tok, ["It is 3."] * 4))
    assert says in caplog.text
    groups = [Group(p, ts) for p, ts in zip(prompts, out)]
    for t in (t for ts in out for t in ts):
        assert t.status == "env_error" and t.outcomes["end_env_error"] == 1 and t.outcomes["turns"] == turns
    assert rollout_metrics(groups)["episode_end_env_error"] == 4
    # The environment's failure is not the response's: nothing of it trains.
    assert rl_batch(groups, recipe.algorithm, max_new_tokens=100, filler_id=tok.eos_token_id).loss_mask.sum() == 0


def test_an_environment_that_cannot_load_is_one_line_naming_the_key(chat_model_dir):
    tok = load_tokenizer(chat_model_dir)
    for override, where, why in [
            ("env.name=tests.cispo.user_envs:NotAnEnvironment", "command line", "expected a class with reset and step"),
            ("env.name=no_such_module:Env", "command line", "cannot be imported"),
            ("env.max_turns=2", str(RECIPE), "set key 'env.name' to 'module:Class'")]:
        with pytest.raises(RecipeError) as err:
            Collector(_recipe(chat_model_dir, override), tok, None, None)
        assert str(err.value).startswith(f"{where}: ") and why in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="command line: key 'env.tools.0' = 'browser': Input should be 'python' or "
                                          "'shell'"):
        _recipe(chat_model_dir, "env.name=tests.cispo.user_envs:Calculator", "env.tools=[browser]")


@pytest.mark.slow  # 51-205 s each on this 2-core machine, by its load
@pytest.mark.parametrize("env", ["tests.cispo.user_envs:GuessGym", "tests.cispo.user_openenv:GuessEnvironment"])
def test_a_gymnasium_or_openenv_environment_trains_through_a_recipe(ray_session, chat_model_dir, tmp_path, env):
    train(_recipe(chat_model_dir, f"env.name={env}", "env.max_turns=2",
                  "env.max_turn_tokens=6", "rollout.max_new_tokens=48", "algorithm.dynamic_sampling=false",
                  "sft.steps=0", "data.eval_size=4", "data.prompts_per_step=4", "rollout.n_samples=4",
                  "run.max_steps=2", "run.threads=1", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]  # step 2 samples from the weights step 1 trained and published
    for r in rows:
        assert r["episode_end_max_turns"] + r["episode_end_done"] + r["episode_end_token_budget"] == 16
        assert r["episode_turns"] > 16 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
        assert r["reward_mean"] > 0  # the environment's rewards, not rescored by the recipe's math reward
        # Inserted tokens have no rollout logprob: had they trained, the IS weight would sit far from 1.
        assert abs(r["is_weight_mean"] - 1) < 0.01 and r["approx_kl"] < 1e-3
