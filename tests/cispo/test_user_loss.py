"""Losses named in a recipe train through `cispo train`'s loop: a user's own 'module:function', imported
on every trainer rank (2 DeepSpeed ranks, gloo), and GSPO, the built-in loss kept in a file of its own."""
from pathlib import Path

import pytest
import torch

from cispo.config import RecipeError, load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from cispo.trainer import TrainerGroup
from rollout.model import load_model
from tests.conftest import REPO, TWO_LAYERS

HERE = Path(__file__).parent
# One-digit addition from a random model (M1's two layer kinds, tests/conftest.py), 2 RL steps, rewarded by
# response length (TRL's example reward, from a module that imports quickly in the scoring processes):
# lengths differ, so groups have spread.
TINY = [TWO_LAYERS, "sft.steps=0", "run.max_steps=2", "data.digits=1", "data.eval_size=10", "data.prompts_per_step=4",
        "rollout.n_samples=4", "run.threads=1", "wandb.mode=disabled", "optim.lr=1e-3", "optim.warmup_steps=0",
        "reward.name=tests.rewards.user_rewards:trl_length"]


def _trained(run_dir: Path) -> bool:
    start, final = load_model(run_dir / "init").state_dict(), load_model(run_dir / "final").state_dict()
    return any(not torch.equal(v, start[k]) for k, v in final.items())


def test_a_users_loss_trains_on_every_rank(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(HERE)  # user_losses.py sits in the working directory, as a user's module would
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", TINY + [
        "algorithm.name=user_losses:reinforce", "trainer.num_ranks=2", f"run.dir={tmp_path / 'run'}"])
    train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    # Both ranks ran the user's function: rank 0's tokens report 0, rank 1's report 1.
    assert all(0 < r["loss_rank"] < 1 for r in rows)
    assert all(r["sandbox_imported"] == 0 for r in rows)  # the ranks got their sections, not the recipe
    assert all(r["grad_norm"] > 0 for r in rows) and _trained(tmp_path / "run")


def test_a_users_loss_that_does_not_load_is_named_before_anything_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken_losses.py").write_text("import no_such_package\n")
    for name, why in [("absent_losses:reinforce", "module 'absent_losses' cannot be imported: ModuleNotFoundError"),
                      ("broken_losses:reinforce", "module 'broken_losses' cannot be imported: ModuleNotFoundError: "
                                                  "No module named 'no_such_package'")]:
        recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", TINY + [f"algorithm.name={name}", f"run.dir={tmp_path / 'run'}"])
        with pytest.raises(RecipeError, match=rf"command line: key 'algorithm.name' = '{name}': {why}"):
            train(recipe)
        assert not (tmp_path / "run").exists()


def test_a_rank_that_cannot_import_the_loss_says_so_and_frees_the_ranks(ray_session, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    # The controller checks first (above); a rank still names the module if its import fails there.
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["run.threads=1", "trainer.num_ranks=2",
                                                            "algorithm.name=absent_losses:reinforce"])
    before = set(ray_session.util.placement_group_table())
    with pytest.raises(ray_session.exceptions.RayTaskError, match="loss 'absent_losses:reinforce': module "
                                                                  "'absent_losses' cannot be imported"):
        TrainerGroup.start(recipe, str(tiny_model_dir))
    ours = [g for key, g in ray_session.util.placement_group_table().items() if key not in before]
    assert len(ours) == 1 and ours[0]["state"] == "REMOVED"


# Slow: a whole run (10-16 s). The quick loop keeps GSPO's loss (tests/cispo/test_loss.py) and a named loss trained
# through a recipe on every rank (the user's loss above); this is their integration, run by `make test`.
@pytest.mark.slow
def test_gspo_trains_through_a_recipe(ray_session, tmp_path):
    # GSPO's ε (3e-4, 4e-4 in the paper) bound a sequence's geometric-mean ratio.
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", TINY + [
        "algorithm.name=gspo", "algorithm.eps_low=3e-4", "algorithm.eps_high=4e-4", "algorithm.normalization=null",
        f"run.dir={tmp_path / 'run'}"])
    assert recipe.algorithm.normalization == "sequence"
    train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    # The first update of a step is on-policy (s = 1); the second sees the moved policy, and its clip binds.
    assert all(r["grad_norm"] > 0 and 0 < r["clip_fraction"] < 1 for r in rows) and _trained(tmp_path / "run")
