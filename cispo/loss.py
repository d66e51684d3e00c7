"""CISPO's loss (MiniMax-M1 §3.1), as the paper writes it."""
from __future__ import annotations

import torch


def _broadcast(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Every token of response i carries A_i, so [B] advantages spread over T.
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


def clipped_is_weight(logprobs, old_logprobs, *, eps_high: float, eps_low: float | None = None):
    """r_t = π_θ/π_old and r̂_t = clip(r_t, 1 − ε_low, 1 + ε_high); M1 sets no lower bound (ε_low = None)."""
    ratio = torch.exp(logprobs - old_logprobs)
    lower = None if eps_low is None else 1.0 - eps_low
    return ratio, torch.clamp(ratio, min=lower, max=1.0 + eps_high)


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, eps_high: float, eps_low: float | None = None,
               group_index=None) -> torch.Tensor:
    """−J_CISPO (Eq. 4–5): −1/Σ_i|o_i| · Σ_i Σ_t sg(r̂_t) · A_i · log π_θ(o_t).

    The clipped weight is detached, so the gradient flows only through log π and no token loses it.
    Tensors are [B, T]; `advantages` may be [B]. With `group_index`, each prompt group is normalized
    by its own response tokens and groups are averaged; without, by the batch's response tokens.
    """
    mask = mask.to(logprobs.dtype)
    _, clipped = clipped_is_weight(logprobs, old_logprobs, eps_high=eps_high, eps_low=eps_low)
    per_token = -clipped.detach() * _broadcast(advantages, logprobs) * logprobs * mask
    if group_index is None:
        return per_token.sum() / mask.sum().clamp(min=1)
    groups, inverse = torch.unique(group_index, return_inverse=True)
    group_sum = torch.zeros(len(groups), dtype=per_token.dtype, device=per_token.device)
    group_tokens = torch.zeros_like(group_sum)
    group_sum.index_add_(0, inverse, per_token.sum(1))
    group_tokens.index_add_(0, inverse, mask.sum(1))
    return (group_sum / group_tokens.clamp(min=1)).mean()
