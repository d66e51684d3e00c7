"""Figures that hold for a whole run are in every metrics row: the code sandbox's isolation level whenever a
data source is scored by running code, and the bad data rows skipped under data.on_bad_row=skip."""
import gzip
import json

from cispo.config import load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from rewards import sandbox
from tests.conftest import REPO, TWO_LAYERS

BAD = ["{not json", json.dumps({"answer": "{}"}), json.dumps({"prompt": "", "answer": "{}"})]


def test_sandbox_level_and_skipped_rows_are_in_every_row(ray_session, tmp_path):
    # As the M1 recipes do it: math by default, code for one data source (reward.sources), here with
    # bad rows in its (gzipped) training split and in its held-out split.
    good = (REPO / "data/tiny-code/train.jsonl").read_text().splitlines()
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write("\n".join(good[:20] + BAD + good[20:40] + BAD[:1]) + "\n")
    held_out = (REPO / "data/tiny-code/eval.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(BAD[1:] + held_out[:8]) + "\n")
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", [
        f"data.sources=[{{name: arith, format: arith}}, {{name: code, format: jsonl, path: {tmp_path}/train.jsonl.gz, "
        f"eval_path: {tmp_path}/eval.jsonl}}]", "reward.sources={code: code}", "data.on_bad_row=skip",
        "model.alphabet=0123456789x+-*=;()intpur\\\\boxed{}", "data.digits=1", "data.eval_size=2",
        "data.prompts_per_step=4", "rollout.n_samples=2", "sft.steps=0", "algorithm.dynamic_sampling=false",
        "run.max_steps=2", "run.threads=1", "wandb.mode=disabled", f"run.dir={tmp_path / 'run'}",
        TWO_LAYERS])  # the records do not depend on the model's size
    assert recipe.reward.name == "math" and recipe.uses_sandbox()
    train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    level = sandbox.isolation(recipe.reward.min_isolation)
    assert all(r["sandbox_isolation"] == level for r in rows)
    assert all(r["data_rows_skipped"] == 4 + 2 for r in rows)  # train and held-out splits

