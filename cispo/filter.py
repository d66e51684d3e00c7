"""`cispo filter RECIPE OUT`: keep the training problems the starting model solves sometimes but not mostly.

M1 kept math problems whose pass@10 lay in (0, 0.9): problems always solved or never solved give every
sample the same reward, so their group advantages are zero and they teach nothing. Runs in-process:
the rollout engine on the recipe's starting model, the recipe's reward in the scoring pool.
"""
from __future__ import annotations

import json
from pathlib import Path

from cispo.config import Recipe, RecipeError
from cispo.data import PromptSource
from rewards.pool import ScoringPool
from rewards.registry import resolve


def filter_by_pass_rate(recipe: Recipe, out: str | Path, n: int = 10, low: float = 0.0, high: float = 0.9) -> dict:
    """Write the training prompts whose pass rate over `n` samples is in (low, high) to `out` as JSONL
    (`prompt`, `answer`, `target`, `source`, `pass_rate`: a `format: jsonl` source reads it back).
    Returns counts of kept and dropped prompts per source."""
    from rollout.engine import Request, SamplingParams, generate
    from rollout.model import starting_model

    data = PromptSource(recipe.data, recipe.run.seed)  # first: a missing data file fails before the model loads
    try:
        model, tok = starting_model(recipe.model)
    except FileNotFoundError as exc:
        raise RecipeError(str(exc)) from None
    model.eval()
    r = recipe.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            stop_token_ids=(tok.eos_token_id,), repetition_tokens=r.repetition_tokens,
                            repetition_prob=r.repetition_prob)
    size, counts = recipe.data.prompts_per_step, {}
    with ScoringPool(recipe.reward.num_workers, recipe.reward.timeout_s) as pool, open(out, "w") as f:
        for name, prompts in data.pools.items():
            try:
                reward = resolve(recipe.reward.sources.get(name, recipe.reward.name))
            except ValueError as exc:  # a 'module:function' that does not import
                raise RecipeError(str(exc)) from None
            kept = 0
            for start in range(0, len(prompts), size):
                chunk = prompts[start:start + size]
                requests = [Request([tok.bos_token_id] + tok(p.text, add_special_tokens=False)["input_ids"], n=n,
                                    seed=recipe.run.seed * 1_000_003 + start + i, params=params)
                            for i, p in enumerate(chunk)]
                completions = generate(model, requests, tok.pad_token_id)
                texts = tok.batch_decode([c.token_ids for c in completions], skip_special_tokens=True)
                results = pool.map(reward, [(t, chunk[c.request_index].answer) for t, c in zip(texts, completions)])
                for i, p in enumerate(chunk):
                    # A pass is a full score: an all-tests pass for code, a correct answer for math.
                    rate = sum(res.score >= 1.0 for res in results[i * n:(i + 1) * n]) / n
                    if low < rate < high:
                        kept += 1
                        f.write(json.dumps({"prompt": p.text, "answer": p.answer, "target": p.reference,
                                            "source": name, "pass_rate": rate}) + "\n")
            counts[name] = {"kept": kept, "dropped": len(prompts) - kept}
    return counts
