"""Reward functions written for other frameworks, used unchanged.

Our own shape is per-sample `fn(response, answer) -> float`. Also accepted:
- batched: `fn(responses, answers) -> list[float]`, marked with `@batched`;
- async: either shape as `async def`;
- verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None)` returning a float
  or a dict with "score";
- TRL: `fn(prompts, completions, **kwargs) -> list[float]`, dataset columns as keyword lists.
`adapt` recognizes verl and TRL functions by their parameter names. Adapters are classes, not
closures, so that the scoring pool can pickle them to its worker processes.
"""
from __future__ import annotations

import asyncio
import inspect


def batched(fn):
    """Mark `fn(responses, answers) -> list[float]` as batched: the pool calls it once per worker."""
    fn.batched = True
    return fn


def call_reward(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, awaited when the reward is async (a fresh event loop: workers have none)."""
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        async def wait():
            return await out
        out = asyncio.run(wait())
    return out


class Verl:
    """A verl `compute_score` as a per-sample reward."""

    def __init__(self, compute_score, data_source: str = "", extra_info: dict | None = None):
        self.compute_score, self.data_source, self.extra_info = compute_score, data_source, extra_info

    def __call__(self, response: str, answer) -> float:
        out = call_reward(self.compute_score, self.data_source, response, answer, self.extra_info)
        return float(out["score"] if isinstance(out, dict) else out)


class Trl:
    """A TRL reward function as a batched reward. Answers that are dicts become dataset columns
    (a "prompt" key fills `prompts`); plain answers are passed as the `answer_key` column."""

    batched = True

    def __init__(self, fn, answer_key: str = "solution"):
        self.fn, self.answer_key = fn, answer_key

    def __call__(self, responses: list[str], answers: list) -> list[float]:
        if all(isinstance(a, dict) for a in answers):
            columns = {k: [a.get(k) for a in answers] for k in answers[0]}
        else:
            columns = {self.answer_key: answers}
        prompts = columns.pop("prompt", [""] * len(responses))
        out = call_reward(self.fn, prompts=prompts, completions=responses, **columns)
        return [0.0 if x is None else float(x) for x in out]  # TRL: None means "not applicable"


def adapt(fn):
    """`fn` wrapped for the pool when its parameters say it was written for verl or TRL."""
    params = list(inspect.signature(fn).parameters)
    if params[:3] == ["data_source", "solution_str", "ground_truth"]:
        return Verl(fn)
    if params[:2] == ["prompts", "completions"]:
        return Trl(fn)
    return fn
