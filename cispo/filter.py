"""`cispo filter RECIPE OUT`: keep the training problems the starting model solves sometimes but not mostly.

M1 kept math problems whose pass@10 lay in (0, 0.9): problems always solved or never solved give every
sample the same reward, so their group advantages are zero and they teach nothing. Runs the training
collection path (cispo.collect) on the recipe's starting model.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

from cispo.collect import running_collector
from cispo.config import Recipe, RecipeError
from cispo.data import PromptSource
from rollout.model import save_model, starting_model


def filter_by_pass_rate(recipe: Recipe, out: str | Path, n: int = 10, low: float = 0.0, high: float = 0.9) -> dict:
    """Write the training prompts whose pass rate over `n` samples is in (low, high) to `out` as JSONL
    (`prompt`, `answer`, `target`, `source`, `pass_rate`, and the row's other fields: a `format: jsonl`
    source reads it back). Returns counts of kept and dropped prompts per source, and of those dropped
    because no response could be scored (`unscored`); warns on stderr when it keeps nothing."""
    if recipe.data.streaming:
        raise RecipeError("cispo filter scores every training prompt, and a stream (data.streaming=true) has no "
                          "end to read to: filter with data.streaming=false")
    source = PromptSource(recipe.data, recipe.run.seed)  # first: a missing data file fails before the model loads
    try:
        model, tok = starting_model(recipe.model)
    except (FileNotFoundError, ValueError) as exc:
        raise RecipeError(str(exc)) from None
    counts, size = {}, recipe.data.prompts_per_step
    with tempfile.TemporaryDirectory() as model_dir, open(out, "w") as f:
        save_model(model, tok, model_dir)  # the rollout workers load it like a run's init/
        with running_collector(recipe, model_dir) as collector:
            for name, prompts in source.pools.items():
                rates = []
                for start in range(0, len(prompts), size):
                    rates += collector.pass_rates(prompts[start:start + size], n, stream=f"filter/{name}/{start}")
                kept = [(p, rate) for p, rate in zip(prompts, rates) if low < rate < high]  # NaN: unscored, dropped
                for p, rate in kept:
                    f.write(json.dumps({**p.fields, "prompt": p.text, "answer": p.answer, "target": p.reference,
                                        "source": name, "pass_rate": rate}) + "\n")
                counts[name] = {"kept": len(kept), "dropped": len(prompts) - len(kept),
                                "unscored": sum(math.isnan(r) for r in rates)}
            if collector.unscored:
                print(f"cispo filter: warning: {collector.unscored} responses could not be scored (reward error or "
                      f"timeout); they count as neither pass nor fail, and a prompt left with none is dropped "
                      f"('unscored')", file=sys.stderr)
    if not any(c["kept"] for c in counts.values()):
        print(f"cispo filter: warning: kept none of {sum(c['dropped'] for c in counts.values())} prompts: no pass "
              f"rate over {n} samples was in ({low}, {high}); the starting model solves all or none of them",
              file=sys.stderr)
    return counts
