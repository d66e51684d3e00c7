"""Rewards by name, adapters for other frameworks, format and weights, through the real pool."""
import math
import sys

import pytest

from rewards import format as format_reward
from rewards.config import RewardConfig
from rewards.pool import ScoringPool
from rewards.registry import build, resolve
from rewards.types import RewardInput
from tests.rewards import user_rewards

MOD = "tests.rewards.user_rewards"


def rows(*pairs, source="s", **fields) -> list[RewardInput]:
    return [RewardInput(prompt=f"prompt {i}", response=r, answer=a, source=source, fields=fields)
            for i, (r, a) in enumerate(pairs)]


ITEMS = rows(("42", "42"), ("41", "42"), ("abc", "abc"))
# Rows as a dataset gives them: prompt, answer, token ids, and other columns that differ per row.
DATASET = [RewardInput(prompt=p, response=r, answer=a, source="gsm8k", completion_ids=tuple(range(n)),
                       fields={"solution": a, "difficulty": d, "extra_info": {"split": "train", "weight": d}})
           for p, r, a, n, d in [("2+2?", "4", "4", 3, 1.0), ("3+3?", " 7", "6", 5, 2.0),
                                 ("sum 1..4?", "10 ", "10", 12, 0.5), ("1+1?", "that is 2", "2", 0, 3.0)]]


@pytest.fixture(scope="module")
def pool():
    with ScoringPool(num_workers=2, timeout_s=20.0) as p:  # first calls import math-verify: slow under load
        yield p


def scores(pool, reward, items):
    results = pool.map(reward, items)
    assert [r.status for r in results] == ["ok"] * len(items), [r.error for r in results]
    return [r.score for r in results]


@pytest.mark.parametrize("name", ["exact", "exact_other_names", "async_exact", "batch_exact"])
def test_our_per_sample_async_and_batched_shapes(pool, name):
    assert scores(pool, resolve(f"{MOD}:{name}"), ITEMS) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("name", ["trl_length", "trl_accuracy", "trl_ids", "trl_difficulty"])
def test_trl_functions_run_unchanged_and_score_as_called_by_trl(pool, name):
    fn = getattr(user_rewards, name)
    # How TRL's GRPOTrainer calls a reward: keywords, every dataset column as a list.
    columns = {k: [x.fields[k] for x in DATASET] for k in DATASET[0].fields} | {"answer": [x.answer for x in DATASET]}
    direct = fn(prompts=[x.prompt for x in DATASET], completions=[x.response for x in DATASET],
                completion_ids=[list(x.completion_ids) for x in DATASET], trainer_state=None, **columns)
    cfg = RewardConfig(name=f"{MOD}:{name}")
    assert scores(pool, build(cfg, "gsm8k"), DATASET) == pytest.approx(direct)
    assert len(set(direct)) > 1  # the rows differ, so a wrong column or order would show


@pytest.mark.parametrize("name", ["compute_score", "compute_score_kwonly"])
def test_verl_compute_score_gets_the_source_and_the_rows_extra_info(pool, name):
    fn = getattr(user_rewards, name)
    direct = [fn(data_source=x.source, solution_str=x.response, ground_truth=x.answer,
                 extra_info=x.fields["extra_info"]) for x in DATASET]
    direct = [d["score"] if isinstance(d, dict) else d for d in direct]
    assert scores(pool, build(RewardConfig(name=f"{MOD}:{name}"), "gsm8k"), DATASET) == direct
    assert direct == ([1.5, 0.5, 1.5, 1.5] if name == "compute_score" else [1.0, 0.0, 0.5, 3.0])


def test_a_reward_reading_the_prompt_sees_it(pool):
    items = [RewardInput(prompt="abc", response="cba", answer="", source="s"),
             RewardInput(prompt="abc", response="abc", answer="", source="s")]
    assert scores(pool, resolve(f"{MOD}:prompt_echo"), items) == [1.0, 0.0]


def test_a_module_beside_the_recipe_resolves_in_the_pool_without_pythonpath(pool, tmp_path):
    (tmp_path / "beside_recipe_rewards.py").write_text(
        "import beside_recipe_helper\n\ndef fn(completions, **kwargs):\n"
        "    return [beside_recipe_helper.score(c) for c in completions]\n")
    (tmp_path / "beside_recipe_helper.py").write_text("def score(c):\n    return len(c) / 10\n")
    with pytest.raises(ValueError, match="cannot be imported"):
        resolve("beside_recipe_rewards:fn")
    reward = build(RewardConfig(name="beside_recipe_rewards:fn"), "s", search=[str(tmp_path)])
    assert scores(pool, reward, ITEMS) == [0.2, 0.2, 0.3]  # scored in worker processes
    sys.modules.pop("beside_recipe_rewards"), sys.modules.pop("beside_recipe_helper")


def test_rewards_that_cannot_load_are_one_line_errors_naming_the_problem(tmp_path):
    with pytest.raises(ValueError, match="valid: math, code, format"):
        resolve("maths")
    with pytest.raises(ValueError, match=r"has no 'nope'"):
        resolve(f"{MOD}:nope")
    with pytest.raises(ValueError, match=r"cannot fill parameter 'mystery'"):
        resolve(f"{MOD}:needs_mystery")
    (tmp_path / "broken_on_import.py").write_text("raise RuntimeError('no GPU here')\n")
    with pytest.raises(ValueError, match=r"cannot be imported: RuntimeError: no GPU here") as err:
        resolve("broken_on_import:fn", search=[str(tmp_path)])
    assert "\n" not in str(err.value)


def test_a_trl_column_missing_from_the_data_is_an_error_naming_it(pool):
    result = pool.map(resolve(f"{MOD}:trl_accuracy"), ITEMS)[0]  # ITEMS have no `solution` column
    assert result.status == "error" and "'solution'" in result.error


@pytest.mark.parametrize("response, detail", [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf"),
                                              ("none", "None"), ("text", "'1.0'")])
def test_non_finite_and_non_numeric_scores_are_counted_errors_scoring_0(pool, response, detail):
    result = pool.map(resolve(f"{MOD}:non_finite"), rows((response, "")))[0]
    assert (result.score, result.status) == (0.0, "error") and detail in result.error


def test_a_nan_in_a_batch_and_under_weights_is_an_error_for_that_sample_only(pool):
    results = pool.map(resolve(f"{MOD}:batch_with_a_nan"), rows(("1", "1"), ("nan", "1"), ("2", "1")))
    assert [(r.score, r.status) for r in results] == [(1.0, "ok"), (0.0, "error"), (0.0, "ok")]
    weighted = build(RewardConfig(name=f"{MOD}:non_finite", format_weight=0.5), "s")
    result = pool.map(weighted, rows(("inf", "")))[0]
    assert (result.score, result.status) == (0.0, "error")
    assert all(math.isfinite(r.score) for r in results)


def test_raising_hanging_and_dying_rewards_get_a_status_and_the_run_goes_on(pool):
    raised = pool.map(resolve(f"{MOD}:raises"), ITEMS[:1])[0]
    assert raised.status == "error" and "KeyError" in raised.error
    with ScoringPool(num_workers=1, timeout_s=1.0) as impatient:
        assert impatient.map(resolve(f"{MOD}:hangs"), ITEMS[:1])[0].status == "timeout"
    assert pool.map(resolve(f"{MOD}:suicide"), ITEMS[:1])[0].status == "error"
    assert scores(pool, resolve(f"{MOD}:exact"), ITEMS) == [1.0, 0.0, 1.0]  # the pool still works


def test_a_harness_failure_in_a_scorer_is_sandbox_error(pool):
    # The code reward raises SandboxFailure when the sandbox itself fails (here: limits it cannot set).
    bad_limits = '{"inputs": [""], "outputs": ["1"], "memory_mb": 1125899906842624}'
    result = pool.map(resolve("code"), rows(("print(1)", bad_limits)))[0]
    assert result.status == "sandbox_error"


def test_code_reward_through_the_pool(pool):
    tests = '{"inputs": ["2\\n"], "outputs": ["4\\n"]}'
    assert scores(pool, build(RewardConfig(name="code"), "s"), rows(("print(int(input()) * 2)", tests),
                                                                     ("print(5)", tests))) == [1.0, 0.0]


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
    fn = build(cfg, "gsm8k")
    assert scores(pool, fn, rows(("<think>2+2</think>\\boxed{4}", "4"), ("\\boxed{4}", "4"),
                                 ("<think>hm</think>\\boxed{5}", "4"))) == [1.5, 1.0, 0.5]
    tests = '{"inputs": [""], "outputs": ["4"]}'
    assert scores(pool, build(cfg, "mbpp"), rows(("<think>t</think>```python\nprint(4)\n```", tests))) == [1.0]
    batched = build(RewardConfig(name=f"{MOD}:batch_exact", format_weight=1.0, format={"pattern": "x"}), "s")
    assert batched.batched
    assert scores(pool, batched, rows(("<think>t</think>x", "<think>t</think>x"), ("x", "y"))) == [2.0, 0.0]
    fraction = build(RewardConfig(name="code", fraction=True), "s")
    half = '{"inputs": ["1", "2"], "outputs": ["1", "1"]}'
    assert scores(pool, fraction, rows(("print(input())", half))) == [0.5]
