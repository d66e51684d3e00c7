import math
import subprocess
import sys

import pytest

from cispo.config import Recipe, RecipeError, dump_recipe, load_recipe, saved_origin
from tests.conftest import REPO

RECIPE = REPO / "recipes" / "tiny-arith.yaml"


def test_recipe_loads_with_paper_defaults_and_overrides():
    r = load_recipe(RECIPE, ["run.max_steps=7", "run.dir=/tmp/x", "algorithm.eps_high=2.5"])
    assert (r.run.max_steps, r.run.dir, r.algorithm.eps_high) == (7, "/tmp/x", 2.5)
    assert r.algorithm.eps_low is None and r.optim.betas == (0.9, 0.95) and r.optim.eps == 1e-15


def test_misspelled_key_names_it_and_suggests_the_right_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("temperature:", "temprature:"))
    with pytest.raises(RecipeError, match=r"unknown key 'rollout.temprature' = 1.0 \(did you mean 'rollout.temperature'\?\)"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unknown key 'run.max_step'.*'run.max_steps'"):
        load_recipe(RECIPE, ["run.max_step=3"])


def test_wrong_type_and_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(RecipeError, match=r"key 'run.max_steps' = 'many'"):
        load_recipe(RECIPE, ["run.max_steps=many"])
    with pytest.raises(RecipeError, match="recipe file not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("run:\n  seed: [1, 2\n")
    with pytest.raises(RecipeError, match="broken.yaml line .*malformed YAML"):
        load_recipe(broken)


@pytest.mark.parametrize("args, expected", [
    (["train", "recipes/missing.yaml"], "recipe file not found: recipes/missing.yaml"),
    (["train", "recipes/tiny-arith.yaml", "rollout.temprature=0.5"], "unknown key 'rollout.temprature'"),
])
def test_cli_prints_one_line_error(args, expected):
    out = subprocess.run([sys.executable, "-m", "cispo.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]


def test_bf16_on_zero_stage_0_is_refused_with_the_reason():
    with pytest.raises(RecipeError, match="bf16 needs zero_stage >= 1"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["trainer.zero_stage=0", "trainer.deepspeed={bf16: {enabled: true}}"])
    assert load_recipe(REPO / "recipes/tiny-arith.yaml", ["trainer.deepspeed={bf16: {enabled: true}}"]).trainer.zero_stage == 2


def test_colocated_replicas_are_refused_where_they_cannot_live_and_warned_where_they_save_nothing():
    recipe = REPO / "recipes/tiny-arith.yaml"  # colocated: its one replica in its one trainer rank
    for overrides, why in ((["rollout.num_workers=2"], "rollout.num_workers=2 replicas need as many trainer ranks"),
                           (["resources.rollout.node_resource=rollout"], "resources.rollout places rollout workers"),
                           (["rollout.overlap=true", "rollout.max_staleness=1", "trainer.num_ranks=2"],
                            "rollout.overlap=true on trainer.num_ranks=2: ranks would wait")):
        with pytest.raises(RecipeError, match=f"resources.colocate=true puts the rollout replicas in trainer ranks; {why}"):
            load_recipe(recipe, overrides)
    assert load_recipe(recipe, ["rollout.num_workers=2", "trainer.num_ranks=2"]).resources.colocate
    with pytest.warns(UserWarning, match="take turns in the one trainer rank, so nothing overlaps"):
        load_recipe(recipe, ["rollout.overlap=true", "rollout.max_staleness=1"])


def test_recipe_key_reference_is_generated_from_the_config():
    from cispo.config import recipe_keys

    text = recipe_keys()
    assert "|  |" not in text  # every key explains itself
    assert "| `algorithm.name` | `'cispo'` |" in text and "Choices: cispo, cispo_masked, grpo, dapo, ppo, gspo or module:function." in text
    assert (REPO / "docs/recipe-keys.md").read_text() == text, \
        "docs/recipe-keys.md is stale: python -m cispo.config > docs/recipe-keys.md"


def test_saved_recipe_loads_back_and_names_its_recipe_file(tmp_path):
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["run.seed=3"])
    dump_recipe(recipe, tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml").model_dump() == recipe.model_dump()
    assert saved_origin(tmp_path / "config.yaml") == REPO / "recipes/tiny-arith.yaml"
    dump_recipe(Recipe.model_validate({"algorithm": {"eps_high": 4.0}}), tmp_path / "built.yaml")
    assert saved_origin(tmp_path / "built.yaml") is None


def test_cosine_schedule_warms_up_then_falls_to_zero_at_the_last_update():
    """optim.schedule=cosine: make run's recipe ends with the policy settled (lr near 0), not mid-swing."""
    r = load_recipe(RECIPE, ["optim.lr=1e-3", "optim.warmup_steps=4", "optim.schedule=cosine"])
    lrs = [r.optim.lr_at(u, 20) for u in range(20)]
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # the warm-up, then the peak
    assert lrs[12] == pytest.approx(5e-4) and lrs[-1] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    constant = load_recipe(RECIPE, ["optim.lr=1e-3", "optim.warmup_steps=4"]).optim
    assert [constant.lr_at(u, 20) for u in (0, 3, 19)] == pytest.approx([2.5e-4, 1e-3, 1e-3])
    with pytest.raises(RecipeError, match="optim.schedule"):
        load_recipe(RECIPE, ["optim.schedule=linear"])
