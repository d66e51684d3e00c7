"""Rewards by name, built-in or a user's 'module:function', and the recipe's reward per data source."""
from __future__ import annotations

import functools
import numbers

from rewards import code, sandbox
from rewards import format as format_reward
from rewards.config import RewardConfig
from rewards.math import verify_boxed
from rewards.plugins import Reward, adapt, load
from rewards.types import RewardInput

BUILTIN = {"math": verify_boxed, "code": code.score, "format": format_reward.score}


def resolve(name: str, search=()) -> Reward:
    """The reward `name` names, adapted for the pool (see `rewards.plugins`): a built-in, or a user's
    'module:function' looked up in the directories `search` (e.g. the working directory and the
    recipe's) and on sys.path. Raises ValueError, one line, for an unknown name, a module that does
    not import, or a function with a parameter that cannot be filled (named)."""
    if name in BUILTIN:
        return adapt(BUILTIN[name])
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(BUILTIN)} or 'module:function'")
    return load(name, search)


def build(cfg: RewardConfig, source: str, search=()) -> Reward:
    """The reward a recipe asks for, for one data source, as the pool calls it with RewardInputs:
    its correctness reward (named per source, else `cfg.name`) weighted and, when `cfg.format_weight`
    is set, plus the format reward. The code reward checks here that the sandbox offers
    `cfg.min_isolation`, so a machine that does not fails at load time. Raises ValueError, one line."""
    name = cfg.sources.get(source, cfg.name)
    if name == "code":
        try:
            sandbox.isolation(cfg.min_isolation)
        except sandbox.SandboxUnavailable as exc:
            raise ValueError(f"reward 'code' for source {source!r}: {exc}") from None
        correct = adapt(functools.partial(code.score, fraction=cfg.fraction, min_isolation=cfg.min_isolation))
    else:
        correct = resolve(name, search)
    if cfg.format_weight == 0 and cfg.correct_weight == 1:
        return correct
    fmt = adapt(functools.partial(format_reward.score, think_in_prompt=cfg.format.think_in_prompt,
                                  pattern=cfg.format.pattern))
    return Weighted(correct, cfg.correct_weight, fmt, cfg.format_weight)


class Weighted(Reward):
    """correct_weight * correctness + format_weight * format (M1's format reward); batched when the
    correctness reward is."""

    def __init__(self, correct: Reward, correct_weight: float, fmt: Reward, format_weight: float):
        self.correct, self.correct_weight, self.fmt, self.format_weight = correct, correct_weight, fmt, format_weight
        self.batched, self.name = correct.batched, None

    def __call__(self, inputs: list[RewardInput]) -> list:
        return [self.correct_weight * c + self.format_weight * f if isinstance(c, numbers.Real) else c
                for c, f in zip(self.correct(inputs), self.fmt(inputs))]  # not a number: the pool reports it
