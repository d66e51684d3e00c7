"""Group-relative advantages: M1 Eq. 2 and the two common variants, each registered in `ESTIMATORS`.

torch is not imported here (tensor methods only), so the config can check estimator names cheaply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from cispo.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

# (centred rewards [N], group size [N], group std [N], eps) -> advantages [N]. `group_relative`: the
# baseline comes from the other responses to the same prompt, so a recipe must sample them differently.
ESTIMATORS = Registry("advantage estimator")


@ESTIMATORS.register("group_std", group_relative=True)
def _group_std(centered, count, std, eps):
    """Eq. 2: centred and divided by the group std."""
    return centered / (std + eps)


@ESTIMATORS.register("no_std", group_relative=True)
def _no_std(centered, count, std, eps):
    """Centred only (Dr. GRPO): dividing by std up-weights nearly-solved and nearly-failed prompts."""
    return centered


@ESTIMATORS.register("leave_one_out", group_relative=True)
def _leave_one_out(centered, count, std, eps):
    """R_i minus the mean of the other G − 1 rewards (RLOO), a baseline independent of R_i; it equals
    G/(G − 1) times the centred reward."""
    return centered * count / (count - 1).clamp(min=1)


def advantages(rewards: Tensor, group_index: Tensor, estimator: str = "group_std", eps: float = 1e-6,
               valid: Tensor | None = None) -> Tensor:
    """Per-response advantage [N] from rewards [N] and each response's prompt group [N].

    `valid` [N] bool (default all True) marks the rewards that say something about their response: the
    others (a sandbox failure, the harness's fault) are left out of their group's size, mean and spread,
    and get A = 0. A group whose valid rewards all agree gets exactly A = 0 under every estimator: its
    float mean need not equal its members (eight 0.65s average to 0.65 + 6e-8 in fp32), and that residue
    divided by a zero std would be a sizeable advantage. ValueError for an unknown estimator.
    """
    fn = ESTIMATORS[estimator].fn
    rewards = rewards.float()
    valid = rewards.new_ones(rewards.shape, dtype=bool) if valid is None else valid.bool()
    groups, inverse = group_index.unique(return_inverse=True)
    count = rewards.new_zeros(len(groups)).index_add_(0, inverse, valid.float())
    mean = rewards.new_zeros(len(groups)).index_add_(0, inverse, rewards.where(valid, 0.0)) / count.clamp(min=1)
    lowest = rewards.new_full((len(groups),), float("inf")).scatter_reduce_(
        0, inverse, rewards.where(valid, float("inf")), "amin")
    highest = rewards.new_full((len(groups),), float("-inf")).scatter_reduce_(
        0, inverse, rewards.where(valid, float("-inf")), "amax")
    centered = (rewards - mean[inverse]).where((highest > lowest)[inverse] & valid, 0.0)
    var = rewards.new_zeros(len(groups)).index_add_(0, inverse, centered**2) / (count - 1).clamp(min=1)
    return fn(centered, count[inverse], var.sqrt()[inverse], eps)


def group_advantages(rewards: Tensor, group_index: Tensor, eps: float = 1e-6) -> Tensor:
    """Eq. 2: A_i = (R_i − mean_j R_j) / std_j R_j over the G responses to the same prompt; 0 for a
    group whose rewards all agree (eps keeps 0/0 finite; dynamic sampling drops such groups)."""
    return advantages(rewards, group_index, "group_std", eps=eps)
