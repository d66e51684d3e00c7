"""Batch shaping between rewards and advantages: overlong responses and DAPO's dynamic sampling.

Pure functions; the collection path (cispo.collect) calls them. torch is not imported here (tensor
methods only), so the config can check overlong modes against `OVERLONG` cheaply.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from cispo.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

TRUNCATED = ("length", "repetition")  # finish reasons of a response cut before it ended

# (rewards [N], cut [N] bool, lengths [N], max_new_tokens, buffer, penalty) -> (rewards [N], keep [N] bool)
OVERLONG = Registry("overlong mode")

Group = TypeVar("Group")


@OVERLONG.register("none")
def _keep_overlong(rewards, cut, lengths, max_new_tokens, buffer, penalty):
    """Truncated responses are trained on like any other."""
    return rewards, cut.new_ones(cut.shape)


@OVERLONG.register("zero")
def _zero_overlong(rewards, cut, lengths, max_new_tokens, buffer, penalty):
    """A truncated response's reward becomes 0."""
    return rewards.masked_fill(cut, 0.0), cut.new_ones(cut.shape)


@OVERLONG.register("mask")
def _mask_overlong(rewards, cut, lengths, max_new_tokens, buffer, penalty):
    """DAPO's overlong filtering: truncated responses count in their group's advantage but get no loss."""
    return rewards, cut.logical_not()


@OVERLONG.register("soft")
def _soft_overlong(rewards, cut, lengths, max_new_tokens, buffer, penalty):
    """DAPO's soft overlong punishment (Eq. 13): −penalty·(|y| − (max_new_tokens − buffer))/buffer over the
    last `buffer` tokens of the budget, and the full −penalty for a truncated response, whose length says
    nothing about when it would have ended."""
    fraction = ((lengths - (max_new_tokens - buffer)) / max(buffer, 1)).clamp(0, 1)
    return rewards - penalty * fraction.masked_fill(cut, 1.0), cut.new_ones(cut.shape)


def overlong(rewards: Tensor, finish_reasons: Sequence[str], lengths: Sequence[int], *, mode: str,
             max_new_tokens: int, buffer: int = 0, penalty: float = 1.0) -> tuple[Tensor, Tensor]:
    """Apply the recipe's rule (`OVERLONG[mode]`) to responses cut by the budget or by repetition.

    Returns (rewards [N] float, keep [N] bool); the caller zeroes the loss mask of rows with keep
    False. ValueError for an unknown mode.
    """
    rule = OVERLONG[mode].fn
    rewards = rewards.float()
    cut = rewards.new_tensor([r in TRUNCATED for r in finish_reasons]).bool()
    return rule(rewards, cut, rewards.new_tensor(list(lengths)), max_new_tokens, buffer, penalty)


def has_spread(rewards: Tensor) -> bool:
    """A group whose rewards all agree has A = 0 for every response: no learning signal."""
    return bool(rewards.numel() > 1 and rewards.max() > rewards.min())


def dynamic_sample(groups: list[Group], draw: Callable[[int], list[Group]], *,
                   rewards: Callable[[Group], Tensor], target: int,
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
