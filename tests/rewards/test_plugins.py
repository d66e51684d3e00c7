"""Rewards by name, adapters for other frameworks, format and weights, through the real pool."""
import pytest

from rewards import format as format_reward
from rewards.config import RewardConfig
from rewards.pool import ScoringPool
from rewards.registry import build, resolve

MOD = "tests.rewards.user_rewards"
ITEMS = [("42", "42"), ("41", "42"), ("abc", "abc")]


@pytest.fixture(scope="module")
def pool():
    with ScoringPool(num_workers=2, timeout_s=20.0) as p:  # first calls import math-verify: slow under load
        yield p


@pytest.mark.parametrize("name", ["exact", "async_exact", "batch_exact", "compute_score"])
def test_plain_async_batched_and_verl_rewards(pool, name):
    results = pool.map(resolve(f"{MOD}:{name}"), ITEMS)
    assert [(r.score, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok"), (1.0, "ok")]


def test_trl_reward_gets_completions_and_dataset_columns(pool):
    results = pool.map(resolve(f"{MOD}:trl_length"), [("12", "34"), ("1", "34"), ("xyz", "abc")])
    assert [r.score for r in results] == [1.0, 0.0, 1.0]


def test_raising_hanging_and_dying_rewards_get_a_status_and_the_run_goes_on(pool):
    raised = pool.map(resolve(f"{MOD}:raises"), ITEMS[:1])[0]
    assert raised.status == "error" and "KeyError" in raised.error
    with ScoringPool(num_workers=1, timeout_s=1.0) as impatient:
        assert impatient.map(resolve(f"{MOD}:hangs"), ITEMS[:1])[0].status == "timeout"
    assert pool.map(resolve(f"{MOD}:suicide"), ITEMS[:1])[0].status == "error"
    assert [r.score for r in pool.map(resolve(f"{MOD}:exact"), ITEMS)] == [1.0, 0.0, 1.0]  # the pool still works


def test_a_harness_failure_in_a_scorer_is_sandbox_error(pool):
    # The code reward raises SandboxFailure when the sandbox itself fails (here: limits it cannot set).
    result = pool.map(resolve("code"), [("print(1)", {"inputs": [""], "outputs": ["1"], "memory_mb": 2**50})])[0]
    assert result.status == "sandbox_error"


def test_code_reward_through_the_pool(pool):
    tests = {"inputs": ["2\n"], "outputs": ["4\n"]}
    results = pool.map(resolve("code"), [("print(int(input()) * 2)", tests), ("print(5)", tests)])
    assert [(r.score, r.status) for r in results] == [(1.0, "ok"), (0.0, "ok")]


def test_unknown_names_are_explained():
    with pytest.raises(ValueError, match="valid: math, code, format"):
        resolve("maths")
    with pytest.raises(ValueError, match="cannot be loaded"):
        resolve(f"{MOD}:nope")


@pytest.mark.parametrize("response, think_in_prompt, expected", [
    ("<think>add them</think> \\boxed{4}", False, 1.0),
    ("  <think>\nadd them\n</think>\nThe sum is \\boxed{4}.", False, 1.0),
    ("\\boxed{4}", False, 0.0),                                  # no thinking
    ("<think></think>\\boxed{4}", False, 0.0),                   # empty thinking
    ("<think>a</think><think>b</think>\\boxed{4}", False, 0.0),  # two blocks
    ("<think>add them</think> four", False, 0.0),                # no boxed answer
    ("add them</think>\\boxed{4}", True, 1.0),                   # the template opened <think>
    ("add them</think>\\boxed{4}", False, 0.0),
])
def test_format_reward(response, think_in_prompt, expected):
    assert format_reward.score(response, think_in_prompt=think_in_prompt) == expected


def test_recipe_weights_and_sources_combine_correctness_and_format(pool):
    cfg = RewardConfig(name="math", correct_weight=1.0, format_weight=0.5, sources={"mbpp": "code"})
    fn = build(cfg)
    results = pool.map(fn, [("<think>2+2</think>\\boxed{4}", "4"), ("\\boxed{4}", "4"), ("<think>hm</think>\\boxed{5}", "4")])
    assert [r.score for r in results] == [1.5, 1.0, 0.5]
    assert build(cfg, source="mbpp").correct is resolve("code")
    batched = build(RewardConfig(name=f"{MOD}:batch_exact", format_weight=1.0, format={"pattern": "x"}))
    assert [r.score for r in pool.map(batched, [("<think>t</think>x", "<think>t</think>x"), ("x", "y")])] == [2.0, 0.0]
    assert build(RewardConfig(name="code", fraction=True)).keywords == {"fraction": True}
