"""Group-relative advantages (MiniMax-M1 Eq. 2)."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i − mean_j R_j) / std_j R_j over the G responses to the same prompt.

    A group whose rewards all agree gets A = 0 (eps keeps 0/0 finite); dynamic sampling drops such groups.
    """
    rewards = rewards.float()
    groups, inverse = torch.unique(group_index, return_inverse=True)
    count = torch.zeros(len(groups)).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(len(groups)).index_add_(0, inverse, rewards) / count
    centered = rewards - mean[inverse]
    var = torch.zeros(len(groups)).index_add_(0, inverse, centered**2) / (count - 1).clamp(min=1)
    return centered / (var.sqrt()[inverse] + eps)
