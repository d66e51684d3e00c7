"""The policy-loss family of MiniMax-M1 §3.1: CISPO (Eq. 4–5), its masked form (Eq. 6–7), and the
PPO-clip losses it was compared with (GRPO, DAPO). Each returns the quantity to minimize (−J).

All tensors are [B, T] token grids; `advantages` may be [B] (one A_i per response) and `mask`
marks response tokens. `policy_loss` picks the per-token objective by name and the normalization.
"""
from __future__ import annotations

import torch

LOSSES = ("cispo", "cispo_masked", "grpo", "dapo", "ppo")
NORMALIZATIONS = ("group", "token", "sequence", "sample_token")


def _broadcast(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # Every token of response i carries A_i, so [B] advantages spread over T.
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


def clipped_is_weight(logprobs, old_logprobs, *, eps_high: float, eps_low: float | None = None):
    """r_t = π_θ/π_old and r̂_t = clip(r_t, 1 − ε_low, 1 + ε_high); M1 sets no lower bound (ε_low = None)."""
    ratio = torch.exp(logprobs - old_logprobs)
    lower = None if eps_low is None else 1.0 - eps_low
    return ratio, torch.clamp(ratio, min=lower, max=1.0 + eps_high)


def ppo_token_mask(ratio, advantages, *, eps_high: float, eps_low: float | None = None) -> torch.Tensor:
    """M_t of Eq. 7: 0 where PPO-clip zeroes the gradient (A > 0, r > 1 + ε_high or A < 0, r < 1 − ε_low)."""
    a = _broadcast(advantages, ratio)
    zeroed = (a > 0) & (ratio > 1 + eps_high)
    if eps_low is not None:
        zeroed |= (a < 0) & (ratio < 1 - eps_low)
    return (~zeroed).to(ratio.dtype)


def masked_objective(logprobs, weight, advantages, token_mask) -> torch.Tensor:
    """Per-token J of Eq. 6: sg(r̂_t) · A_i · M_t · log π_θ(o_t).

    The weight is detached, so the gradient flows only through log π. CISPO (Eq. 4) is M ≡ 1: no token
    loses its gradient; passing r̂ = r and Eq. 7's M gives PPO-clip's gradient instead.
    """
    return weight.detach() * _broadcast(advantages, logprobs) * token_mask * logprobs


def ppo_clip_objective(ratio, clipped, advantages) -> torch.Tensor:
    """Per-token PPO-clip surrogate min(r·A, r̂·A) (GRPO and DAPO): zero gradient where the clip binds."""
    a = _broadcast(advantages, ratio)
    return torch.minimum(ratio * a, clipped * a)


def token_weights(mask, normalization: str, group_index=None) -> torch.Tensor:
    """Per-token weights w with Σ w_t·ℓ_t the normalized loss, so a batch split into micro-batches
    and ranks sums back to exactly the whole-batch value.

    group:    M1 Eq. 4, 1/Σ_i|o_i| within each prompt group, then the mean over groups
              (without group_index the batch is one group);
    token:    the batch's token mean (DAPO), so long responses weigh more;
    sequence: each response's token mean, then the mean over responses (GRPO), so each counts once;
    sample_token: the mean of `sequence` and `token`; M1's 80k stage combines a sample-level loss with
              token-level normalization but gives no formula, and this is our reading of it.
    Empty rows (fully masked responses) and empty groups do not count in the means.
    """
    mask = mask.float()
    token = mask / mask.sum().clamp(min=1)
    if normalization == "token" or (normalization == "group" and group_index is None):  # one group: the token mean
        return token
    row_tokens = mask.sum(1, keepdim=True)
    if normalization in ("sequence", "sample_token"):
        sequence = mask / row_tokens.clamp(min=1) / (row_tokens > 0).sum().clamp(min=1)
        return sequence if normalization == "sequence" else (sequence + token) / 2
    if normalization == "group":
        groups, inverse = torch.unique(group_index, return_inverse=True)
        group_tokens = torch.zeros(len(groups), device=mask.device).index_add_(0, inverse, row_tokens.squeeze(1))
        return mask / group_tokens[inverse].clamp(min=1).unsqueeze(1) / (group_tokens > 0).sum().clamp(min=1)
    raise ValueError(f"unknown normalization {normalization!r}; valid: {', '.join(NORMALIZATIONS)}")


def normalize(per_token, mask, normalization: str, group_index=None) -> torch.Tensor:
    """Reduce masked per-token losses to a scalar (see `token_weights`)."""
    return (per_token * token_weights(mask, normalization, group_index).to(per_token.dtype)).sum()


def token_loss(name: str, logprobs, old_logprobs, advantages, *, eps_high: float,
               eps_low: float | None = None) -> torch.Tensor:
    """Per-token −J of the loss `name`:

    cispo:        Eq. 4–5, every token keeps sg(r̂)·A·∇log π;
    cispo_masked: Eq. 6–7, CISPO's weight with PPO-clip's token mask;
    grpo / dapo / ppo: the PPO-clip surrogate; they differ only in the ε and normalization a recipe sets
                  (GRPO: sequence; DAPO: token with ε_low 0.2, ε_high 0.28).
    """
    ratio, clipped = clipped_is_weight(logprobs, old_logprobs, eps_high=eps_high, eps_low=eps_low)
    if name == "cispo":
        return -masked_objective(logprobs, clipped, advantages, 1.0)
    if name == "cispo_masked":
        m = ppo_token_mask(ratio, advantages, eps_high=eps_high, eps_low=eps_low)
        return -masked_objective(logprobs, clipped, advantages, m)
    if name in ("grpo", "dapo", "ppo"):
        return -ppo_clip_objective(ratio, clipped, advantages)
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")


def policy_loss(name: str, logprobs, old_logprobs, advantages, mask, *, eps_high: float,
                eps_low: float | None = None, normalization: str = "group", group_index=None) -> torch.Tensor:
    """−J for the loss `name` (`token_loss`), reduced with `normalization` (`token_weights`)."""
    per_token = token_loss(name, logprobs, old_logprobs, advantages, eps_high=eps_high, eps_low=eps_low)
    return normalize(per_token, mask, normalization, group_index)


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, eps_high: float, eps_low: float | None = None,
               group_index=None) -> torch.Tensor:
    """−J_CISPO (Eq. 4–5): −1/Σ_i|o_i| · Σ_i Σ_t sg(r̂_t) · A_i · log π_θ(o_t).

    With `group_index`, each prompt group is normalized by its own response tokens and groups are
    averaged; without, by the batch's response tokens.
    """
    return policy_loss("cispo", logprobs, old_logprobs, advantages, mask, eps_high=eps_high, eps_low=eps_low,
                       normalization="group", group_index=group_index)


@torch.no_grad()
def loss_metrics(logprobs, old_logprobs, advantages, mask, entropy, *, eps_high: float,
                 eps_low: float | None = None) -> dict[str, float]:
    """Per-update health figures over response tokens.

    ppo_zeroed_fraction is the share of tokens Eq. 7's mask zeroes at this ε: the high-ratio "fork"
    tokens PPO-clip would drop and CISPO keeps. approx_kl is k3 = (r − 1) − log r, an unbiased
    estimate of KL(π_old ‖ π_θ) from tokens sampled by π_old.
    """
    on = mask.bool()
    if not on.any():  # a minibatch of fully masked responses (e.g. overlong "mask") has nothing to report
        return {}
    ratio, clipped = clipped_is_weight(logprobs, old_logprobs, eps_high=eps_high, eps_low=eps_low)
    r = ratio[on]
    zeroed = 1 - ppo_token_mask(ratio, advantages, eps_high=eps_high, eps_low=eps_low)[on]
    return {
        "clip_fraction": float((clipped[on] != r).float().mean()),
        "ppo_zeroed_fraction": float(zeroed.mean()),
        "is_weight_mean": float(r.mean()),
        "is_weight_max": float(r.max()),
        "entropy": float(entropy[on].mean()),
        "approx_kl": float(((r - 1) - r.log()).mean()),
    }
