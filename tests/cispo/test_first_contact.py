"""First contact: a mistake in a recipe or on the command line is one line (exit 2) naming the key, its value
and where it came from (the recipe file, or the command line), before any model is built or Ray started."""
import subprocess
import sys

import pytest
import yaml

from cispo.config import RecipeError, load_recipe
from cispo.sections import DEEPSPEED_KEYS
from tests.conftest import REPO

TINY = REPO / "recipes/tiny-arith.yaml"
CLI = [sys.executable, "-m", "cispo.cli"]


def _cli(*args, cwd=REPO):
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _with(tmp_path, key: str, value: str):
    """tiny-arith.yaml with `key: value` written into the file."""
    tree = yaml.safe_load(TINY.read_text())
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("key, value, message", [
    ("rollout.n_samples", "lots", "key 'rollout.n_samples' = 'lots': Input should be a valid integer"),
    ("model.preset", "tinyy", "key 'model.preset' = 'tinyy': unknown model preset 'tinyy'; valid presets: tiny, small, m1"),
    ("trainer.deepspeed.bogus", "1", "unknown key 'trainer.deepspeed.bogus': DeepSpeed has no top-level key 'bogus'"),
    ("trainer.deepspeed", "{zero_optimisation: {stage: 3}}", "unknown key 'trainer.deepspeed.zero_optimisation': "
     "DeepSpeed has no top-level key 'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ("reward.name", "maths", "reward.name: unknown reward 'maths'"),
    ("data.sources", "[{name: a, format: arith, wieght: 2}]", "unknown key 'data.sources.0.wieght'"),
])
def test_error_names_the_key_the_value_and_where_it_came_from(tmp_path, key, value, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(TINY, ["run.max_steps=3", f"{key}={value}"])
    assert str(err.value).startswith(f"command line: {message}") and "\n" not in str(err.value)
    # The same value written in a recipe file is the file's, whatever else the command line sets.
    path = _with(tmp_path, key, value)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["run.max_steps=3", "trainer.deepspeed.fp16={enabled: false}"])
    assert str(err.value).startswith(f"{path}: {message}")


def test_known_deepspeed_keys_pass_and_are_deepspeeds_own():
    """DEEPSPEED_KEYS is exactly what DeepSpeed's config parser reads: recorded here from its own reads."""
    from deepspeed.runtime.config import DeepSpeedConfig

    read = set()

    class Recording(dict):
        def get(self, key, default=None):
            read.add(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def keys(self):  # `KEY in param_dict.keys()`
            return self

        def __copy__(self):
            return self

    DeepSpeedConfig(Recording(train_batch_size=1, train_micro_batch_size_per_gpu=1))
    assert DEEPSPEED_KEYS == read, (sorted(read - DEEPSPEED_KEYS), sorted(DEEPSPEED_KEYS - read))
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert load_recipe(TINY, [f"trainer.deepspeed={ds}"]).trainer.deepspeed == ds


def test_train_with_a_reward_that_cannot_load_stops_before_the_model(tmp_path):
    run_dir = tmp_path / "run"
    out = _cli("train", str(TINY), "reward.name=nosuch:fn", f"run.dir={run_dir}")
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"cispo: error: command line: key 'reward.name' = 'nosuch:fn': module 'nosuch' cannot be imported: "
        f"ModuleNotFoundError: No module named 'nosuch' (searched {REPO}, {REPO / 'recipes'} and sys.path)"]
    assert not run_dir.exists() and "Ray" not in out.stdout + out.stderr


def test_plan_warns_for_each_reward_that_cannot_load():
    out = _cli("plan", str(TINY), "reward.name=nosuch:fn")
    assert out.returncode == 0 and "fits: no warnings" not in out.stdout
    assert "warning: data source 'arith': command line: key 'reward.name' = 'nosuch:fn': module 'nosuch' " \
           "cannot be imported" in out.stdout
    # A module that imports but whose function takes a parameter no reward gets, per source.
    two = "data.sources=[{name: a, format: arith}, {name: b, format: arith}]"
    out = _cli("plan", str(TINY), two, "reward.sources={b: 'tests.rewards.user_rewards:needs_mystery'}")
    assert "warning: data source 'a'" not in out.stdout
    assert "warning: data source 'b': command line: key 'reward.sources.b' = " \
           "'tests.rewards.user_rewards:needs_mystery': reward needs_mystery: cannot fill parameter 'mystery'" in out.stdout


ALWAYS_ONE = "def always_one(response, answer):\n    return 1.0\n"


def test_user_reward_modules_resolve_from_the_working_and_the_recipe_directory(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    (here / "my_rewards.py").write_text(ALWAYS_ONE)
    out = _cli("plan", str(TINY), "reward.name=my_rewards:always_one", cwd=here)
    assert out.returncode == 0 and "fits: no warnings" in out.stdout, out.stdout + out.stderr
    # Beside the recipe, run from elsewhere.
    (there / "beside.py").write_text(ALWAYS_ONE)
    recipe = there / "recipe.yaml"
    recipe.write_text(TINY.read_text().replace("name: math", "name: beside:always_one"))
    out = _cli("plan", str(recipe), cwd=here)
    assert out.returncode == 0 and "fits: no warnings" in out.stdout, out.stdout + out.stderr
    # Elsewhere it is not found, and the message says where it looked.
    out = _cli("plan", str(TINY), "reward.name=beside:always_one", cwd=here)
    assert f"(searched {here}, {REPO / 'recipes'} and sys.path)" in out.stdout

