"""Every recipe loads and plans; the M1 recipes state the paper's values; bad recipes fail in one line."""
import pytest

from cispo import plan
from cispo.cli import main
from cispo.config import RecipeError, load_recipe
from tests.conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_plans(path):
    recipe = load_recipe(path)
    text = plan.render(plan.build(recipe), recipe)
    assert "FLOPs per generated token" in text and "memory per" in text


def test_m1_recipes_state_the_papers_values():
    r40, r80 = load_recipe(REPO / "recipes/m1-40k.yaml"), load_recipe(REPO / "recipes/m1-80k.yaml")
    for r in (r40, r80):
        assert r.algorithm.name == "cispo" and r.algorithm.eps_low is None and r.algorithm.updates_per_batch == 16
        assert r.optim.eps == 1e-15 and r.optim.betas == (0.9, 0.95)
        assert (r.rollout.repetition_tokens, r.rollout.repetition_prob) == (3000, 0.99)
        assert r.resources.rollout.node_resource and r.resources.trainer.gpus == 1
    assert r40.rollout.max_new_tokens == 40_000 and not r40.stages.windows
    assert {s.name for s in r40.data.sources} >= {"math", "logic", "code"}
    assert any(s.start_step > 0 for s in r40.data.sources)  # general data joins later
    assert r80.stages.windows == [40_000, 48_000, 56_000, 64_000, 72_000, 80_000]
    assert r80.model.path == "runs/m1-40k/final" and r80.algorithm.normalization == "sample_token"
    assert r80.algorithm.eps_high < r40.algorithm.eps_high and r80.optim.grad_clip < r40.optim.grad_clip


def test_tiny_staged_windows_end_at_its_budget():
    r = load_recipe(REPO / "recipes/tiny-staged.yaml")
    assert r.stages.windows[-1] == r.rollout.max_new_tokens and len(r.stages.windows) >= 3


TINY = REPO / "recipes/tiny-arith.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["algorithm.eps_hgih=2"], "unknown key 'algorithm.eps_hgih' = 2 (did you mean 'algorithm.eps_high'?)"),
    (["data.sources=[{name: a, format: arith, wieght: 2}]"],
     "unknown key 'data.sources.0.wieght' = 2 (did you mean 'data.sources.0.weight'?)"),
    (["rollout.n_samples=lots"], "key 'rollout.n_samples' = 'lots': Input should be a valid integer"),
    (["algorithm.name=ppo2"], "key 'algorithm.name' = 'ppo2': unknown loss 'ppo2'; valid: cispo, cispo_masked,"),
    (["data.source=csv"], "key 'data.source' = 'csv': unknown data format 'csv'; valid: arith, jsonl,"),
    (["eval.k=4"], "eval.k=4 needs at least that many eval.n_samples (got 1)"),
    (["reward.name=maths"], "reward.name: unknown reward 'maths'; valid: math, code, format or 'module:function'"),
    (["reward.sources={gsm8k: math}"], "reward.sources: 'gsm8k' is not a data source; sources: arith"),
    (["stages.windows=[8, 10]"], "stages.windows ends at 10 but rollout.max_new_tokens is 12"),
    # rllm PR #917: every group-relative advantage would be 0; ours: the other ways to sample G identical responses
    (["rollout.n_samples=1"], "rollout.n_samples=1 gives one sample per prompt, so algorithm.advantage=group_std"),
    (["rollout.temperature=0", "algorithm.advantage=leave_one_out"],
     "rollout.temperature=0 samples greedily, so algorithm.advantage=leave_one_out"),
    (["rollout.top_k=1"], "rollout.top_k=1 samples greedily, so algorithm.advantage=group_std"),
])
def test_bad_recipe_is_one_line_error(overrides, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_missing_data_file_is_one_line_error(tmp_path, capsys):
    code = main(["filter", str(REPO / "recipes/tiny-code.yaml"), str(tmp_path / "out.jsonl"), "data.path=data/nope.jsonl"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "cispo: error: data file not found: data/nope.jsonl"
