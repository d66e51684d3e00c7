"""Reward functions by name: built-in names or a user's 'module:function', and the recipe's mix."""
from __future__ import annotations

import functools
import importlib

from rewards import code
from rewards import format as format_reward
from rewards.config import RewardConfig
from rewards.math import verify_boxed
from rewards.plugins import adapt, call_reward

BUILTIN = {"math": verify_boxed, "code": code.score, "format": format_reward.score}


def resolve(name: str):
    """A reward for `name`: per-sample `fn(response, answer) -> float`, or batched (`fn.batched`).
    A user's function written for verl or TRL comes back adapted (see `rewards.plugins`)."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(BUILTIN)} or 'module:function'")
    module, _, attr = name.partition(":")
    try:
        return adapt(getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r} cannot be loaded: {exc}") from None


def build(cfg: RewardConfig, source: str | None = None):
    """The reward a recipe asks for, for one data source: its correctness reward (named per source,
    else `cfg.name`) weighted and, when `cfg.format_weight` is set, plus the format reward."""
    fn = resolve(cfg.sources.get(source, cfg.name))
    if fn is code.score and cfg.fraction:
        fn = functools.partial(code.score, fraction=True)
    if cfg.format_weight == 0 and cfg.correct_weight == 1:
        return fn
    fmt = functools.partial(format_reward.score, think_in_prompt=cfg.format.think_in_prompt, pattern=cfg.format.pattern)
    return Weighted(fn, cfg.correct_weight, fmt, cfg.format_weight)


class Weighted:
    """correct_weight * correctness + format_weight * format; batched when the correctness reward is."""

    def __init__(self, correct, correct_weight: float, fmt, format_weight: float):
        self.correct, self.correct_weight, self.fmt, self.format_weight = correct, correct_weight, fmt, format_weight
        self.batched = getattr(correct, "batched", False)

    def __call__(self, response, answer):
        if self.batched:
            scores = call_reward(self.correct, response, answer)
            return [self._mix(s, r) for s, r in zip(scores, response)]
        return self._mix(call_reward(self.correct, response, answer), response)

    def _mix(self, correct: float, response: str) -> float:
        return self.correct_weight * float(correct) + self.format_weight * self.fmt(response)
