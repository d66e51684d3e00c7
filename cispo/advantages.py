"""Group-relative advantages: M1 Eq. 2 and the two common variants, chosen by name from the recipe."""
from __future__ import annotations

import torch

ESTIMATORS = ("group_std", "no_std", "leave_one_out")


def _group_stats(rewards: torch.Tensor, group_index: torch.Tensor):
    """Per-response group size, group mean and unbiased group std (each broadcast back to [N])."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    n = int(inverse.max()) + 1 if len(inverse) else 0
    count = torch.zeros(n).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(n).index_add_(0, inverse, rewards) / count
    centered = rewards - mean[inverse]
    var = torch.zeros(n).index_add_(0, inverse, centered**2) / (count - 1).clamp(min=1)
    return count[inverse], mean[inverse], var.sqrt()[inverse]


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 2: A_i = (R_i − mean_j R_j) / std_j R_j over the G responses to the same prompt.

    A group whose rewards all agree gets A = 0 (eps keeps 0/0 finite); dynamic sampling drops such groups.
    """
    return advantages(rewards, group_index, "group_std", eps=eps)


def advantages(rewards: torch.Tensor, group_index: torch.Tensor, estimator: str = "group_std",
               eps: float = 1e-6) -> torch.Tensor:
    """Per-response advantage [N] from rewards [N] and each response's prompt group.

    group_std:     Eq. 2, centred and divided by the group std;
    no_std:        centred only (Dr. GRPO): dividing by std up-weights nearly-solved and nearly-failed prompts;
    leave_one_out: R_i minus the mean of the other G − 1 rewards (RLOO), a baseline independent of R_i;
                   it equals G/(G − 1) times the centred reward.
    """
    rewards = rewards.float()
    count, mean, std = _group_stats(rewards, group_index)
    centered = rewards - mean
    if estimator == "group_std":
        return centered / (std + eps)
    if estimator == "no_std":
        return centered
    if estimator == "leave_one_out":
        return centered * count / (count - 1).clamp(min=1)
    raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
