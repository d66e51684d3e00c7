"""Batch shaping between rewards and advantages: overlong responses and DAPO's dynamic sampling.

Pure functions; the controller calls them and owns generation (DESIGN §3, step 4).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

OVERLONG = ("none", "zero", "mask", "soft")
TRUNCATED = ("length", "repetition")  # finish reasons of a response cut before it ended

Group = TypeVar("Group")


def overlong(rewards: torch.Tensor, finish_reasons: Sequence[str], lengths: Sequence[int], *, mode: str,
             budget: int, buffer: int = 0, penalty: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the recipe's rule to responses cut by the budget or by repetition truncation.

    Returns (rewards [N], keep [N] bool); the controller zeroes the loss mask of rows with keep False.
    none: leave them; zero: their reward becomes 0; mask: they take part in their group's advantage
    but get no loss (DAPO's overlong filtering); soft: DAPO's soft overlong punishment (Eq. 13), adding
    −penalty·(|y| − (budget − buffer))/buffer over the last `buffer` tokens of the budget, and the full
    −penalty to a truncated response, whose length says nothing about when it would have ended.
    """
    rewards = rewards.float().clone()
    cut = torch.tensor([r in TRUNCATED for r in finish_reasons], dtype=torch.bool)
    keep = torch.ones_like(cut)
    if mode == "zero":
        rewards[cut] = 0.0
    elif mode == "mask":
        keep = ~cut
    elif mode == "soft":
        over = torch.tensor(lengths, dtype=torch.float32) - (budget - buffer)
        fraction = (over / max(buffer, 1)).clamp(0, 1)
        rewards -= penalty * torch.where(cut, 1.0, fraction)
    elif mode != "none":
        raise ValueError(f"unknown overlong mode {mode!r}; valid: {', '.join(OVERLONG)}")
    return rewards, keep


def has_spread(rewards: torch.Tensor) -> bool:
    """A group whose rewards all agree has A = 0 for every response: no learning signal."""
    return bool(rewards.numel() > 1 and rewards.max() > rewards.min())


def dynamic_sample(groups: list[Group], draw: Callable[[int], list[Group]], *,
                   rewards: Callable[[Group], torch.Tensor], target: int,
                   max_draws: int) -> tuple[list[Group], dict[str, int]]:
    """DAPO's dynamic sampling: drop zero-spread groups, then refill to `target` groups.

    `groups` are the scored prompt groups of this step (any type; `rewards(g)` gives a group's
    rewards). `draw(k)` generates and scores k more prompts and returns their groups; it is called at
    most `max_draws` times, so a step whose prompts are all solved (or all failed) still ends.
    Each draw asks for the shortfall divided by the share of groups kept so far (at most `target`).
    Groups past `target` are discarded (counted as unused); the batch may stay short when the draws
    run out, and is empty when no group had spread.
    """
    def split(batch):  # (groups with spread, how many had none)
        good = [g for g in batch if has_spread(rewards(g))]
        return good, len(batch) - len(good)

    kept, dropped = split(groups)
    seen, refilled, draws = len(groups), 0, 0
    while len(kept) < target and draws < max_draws:
        short = target - len(kept)
        # Scale by the observed keep rate ((kept + 1) / (seen + 1), never zero), but never ask for
        # more than one step's worth of prompts at once.
        more = draw(min(target, math.ceil(short * (seen + 1) / (len(kept) + 1))))
        good, bad = split(more)
        good = good[:short]
        kept += good
        draws, seen, dropped, refilled = draws + 1, seen + len(more), dropped + bad, refilled + len(good)
    return kept[:target], {"groups_dropped": dropped, "groups_refilled": refilled,
                           "groups_unused": seen - dropped - len(kept[:target]), "sampling_draws": draws}
