"""`cispo eval RECIPE [model=RUN_DIR|HF_DIR] [key=value ...]`: score a model on the recipe's held-out split.

Greedy accuracy (`eval.n_samples: 1`), or unbiased pass@k from `eval.n_samples` samples at the rollout
temperature, through the same collection path as training (cispo.collect): same prompt encoding,
sampling parameters and rewards.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from cispo import checkpoint
from cispo.collect import running_collector
from cispo.config import Recipe, RecipeError
from cispo.data import PromptSource


def model_dir(model: str | Path, scratch: str) -> Path:
    """An HF directory for `model`: an HF dir as it is; a run dir's final/ model, or else its newest
    checkpoint exported into `scratch`."""
    path = Path(model)
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "init").is_dir() and checkpoint.complete_checkpoints(path):
        from cispo.export import export

        export(path, scratch)
        return Path(scratch)
    raise RecipeError(f"model={model}: not an HF model directory, nor a run dir with final/ or a checkpoint")


def evaluate(recipe: Recipe, model: str | Path | None = None, out: str | Path | None = None) -> dict:
    """Score `model` (default: the recipe's run.dir) and write the result as JSON to `out` (default:
    eval.json in the run dir, or in the working directory for an HF dir). Returns the result:
    `metric` (greedy_accuracy or pass@k), `value`, `per_source`, `prompts`, `prompts_scored`,
    `unscored_responses` (reward errors and timeouts: left out of the estimate, never counted as fails),
    `model`. RecipeError when no prompt could be scored."""
    e = recipe.eval
    prompts = PromptSource(recipe.data, recipe.run.seed).eval
    if not prompts:
        raise RecipeError("the recipe has no held-out prompts: give its data source an eval_path")
    model = Path(model or recipe.run.dir)
    with tempfile.TemporaryDirectory() as scratch:
        path = model_dir(model, scratch)
        with running_collector(recipe, str(path)) as collector:
            rates = collector.pass_rates(prompts, e.n_samples, e.k)
            unscored = collector.unscored
    by_source = defaultdict(list)
    for p, rate in zip(prompts, rates):
        if not math.isnan(rate):  # fewer than k responses could be scored: no estimate, counted below
            by_source[p.source].append(rate)
    scored = [r for rs in by_source.values() for r in rs]
    if not scored:
        raise RecipeError(f"no held-out prompt could be scored: {unscored} responses got a reward error or timeout "
                          f"(reward.name, reward.timeout_s)")
    if unscored:
        print(f"cispo eval: warning: {unscored} of {len(prompts) * e.n_samples} responses could not be scored "
              "(reward error or timeout); the estimate is over the rest",
              file=sys.stderr)
    result = {"metric": "greedy_accuracy" if e.n_samples == 1 else f"pass@{e.k}", "value": statistics.fmean(scored),
              "per_source": {k: statistics.fmean(v) for k, v in by_source.items()}, "prompts": len(prompts),
              "prompts_scored": len(scored), "unscored_responses": unscored, "n_samples": e.n_samples,
              "model": str(model)}
    out = Path(out) if out else (model if path != model else Path.cwd()) / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    result["out"] = str(out)
    return result
