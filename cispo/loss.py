"""The policy-loss family of MiniMax-M1 §3.1: CISPO (Eq. 4–5), its masked form (Eq. 6–7), and the
PPO-clip losses it was compared with (GRPO, DAPO). Each returns the quantity to minimize (−J).

A loss is one function, registered in `LOSSES` with its paper's normalization and whether it clips
from below (GSPO, in cispo/gspo.py, shows one in a file of its own), or a user's 'module:function'
(`resolve`). Every loss is called the same way, on every trainer rank, per micro-batch:

    fn(logprobs, old_logprobs, advantages, mask, *, group_index, cfg) -> (per_token_loss, figures)

- logprobs [B, T] (with gradient), old_logprobs [B, T]: log π_θ and log π_old of each target token;
- advantages [B], one A_i per response; mask [B, T], 1 on the response tokens that get a loss;
- group_index [B], the prompt group of each row; cfg, the loss's section (`LossConfig`);
- per_token_loss [B, T]: ℓ_t, which the trainer reduces as Σ w_t·ℓ_t with the normalization's weights
  (`token_weights`), so a sequence-level loss spreads its term over the response's tokens;
- figures: name -> [B, T] per-token values, reported as their mean over the step's response tokens.

torch is not imported here: only tensor methods are used, so the config (and `cispo plan`) can check
loss names against these registries without loading torch.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Callable

from pydantic import Field, field_validator

from cispo.registry import Registry
from cispo.section import Section, choice
from rewards.plugins import import_function

if TYPE_CHECKING:
    from torch import Tensor

LOSSES = Registry("loss")                    # meta: normalization, needs_eps_low
NORMALIZATIONS = Registry("normalization")   # mask [B, T] (, group_index [B]) -> weights [B, T]


class LossConfig(Section):
    """The loss's own keys (under `algorithm` in a recipe): what each trainer rank's loss reads."""
    name: str = choice(LOSSES, "the policy loss: cispo: M1 Eq. 4-5; cispo_masked: Eq. 6-7; grpo/dapo/ppo: "
                       "the PPO-clip surrogate; gspo: GSPO's sequence-level ratio; or a user's "
                       "'module:function' (docs/architecture.md#losses)", "cispo", plugin=True)
    eps_high: float = Field(..., gt=0, description="upper clip of the IS weight; M1 does not publish it, so recipes state it")
    eps_low: float | None = Field(None, gt=0, validate_default=True,
                                  description="lower clip; M1 uses none; PPO-clip losses need it (DAPO: 0.2)")
    normalization: str | None = choice(
        NORMALIZATIONS, "group: 1/Σ|o_i| per prompt (Eq. 4); token: batch token mean; sequence: mean of response "
        "means; sample_token: M1 80k's sample-level loss with token normalization; unset: the loss's own (cispo "
        "group, grpo/gspo sequence, dapo/ppo token; a user's loss: token)", None, validate_default=True)

    @field_validator("eps_low")
    @classmethod
    def _clip_from_below_needs_eps_low(cls, v, info):
        name = info.data.get("name")
        if v is None and name in LOSSES and LOSSES[name].meta["needs_eps_low"]:
            raise ValueError(f"{name} clips the ratio from below too; state eps_low (GRPO and DAPO use 0.2)")
        return v

    @field_validator("normalization", mode="after")
    @classmethod
    def _default_normalization(cls, v, info):
        # Each loss's own paper normalizes differently (registered with the loss); a recipe value wins.
        name = info.data.get("name")
        if v is not None or not name:
            return v
        return LOSSES[name].meta["normalization"] if name in LOSSES else "token"


def resolve(name: str, search=()) -> Callable:
    """The loss function `name` names: a registered one, or a user's 'module:function' imported from the
    directories `search` (then sys.path), as a user's reward is. ValueError, one line, if it cannot load."""
    return import_function(name, search, kind="loss") if ":" in name else LOSSES[name].fn


def _broadcast(advantages: Tensor, like: Tensor) -> Tensor:
    # Every token of response i carries A_i, so [B] advantages spread over T.
    return advantages.unsqueeze(1).expand_as(like) if advantages.dim() == 1 else advantages


def clipped_is_weight(logprobs, old_logprobs, *, eps_high: float, eps_low: float | None = None):
    """r_t = π_θ/π_old and r̂_t = clip(r_t, 1 − ε_low, 1 + ε_high); M1 sets no lower bound (ε_low = None)."""
    ratio = (logprobs - old_logprobs).exp()
    lower = None if eps_low is None else 1.0 - eps_low
    return ratio, ratio.clamp(min=lower, max=1.0 + eps_high)


def clipped(ratio, clipped_ratio) -> dict:
    """The `clip_fraction` figure: 1 on each token whose weight the clip changed."""
    return {"clip_fraction": (clipped_ratio != ratio).detach().float()}


def ppo_token_mask(ratio, advantages, *, eps_high: float, eps_low: float | None = None) -> Tensor:
    """M_t of Eq. 7: 0 where PPO-clip zeroes the gradient (A > 0, r > 1 + ε_high or A < 0, r < 1 − ε_low)."""
    a = _broadcast(advantages, ratio)
    zeroed = (a > 0) & (ratio > 1 + eps_high)
    if eps_low is not None:
        zeroed |= (a < 0) & (ratio < 1 - eps_low)
    return (~zeroed).to(ratio.dtype)


def masked_objective(logprobs, weight, advantages, token_mask) -> Tensor:
    """Per-token J of Eq. 6: sg(r̂_t) · A_i · M_t · log π_θ(o_t).

    The weight is detached, so the gradient flows only through log π. CISPO (Eq. 4) is M ≡ 1: no token
    loses its gradient; passing r̂ = r and Eq. 7's M gives PPO-clip's gradient instead.
    """
    return weight.detach() * _broadcast(advantages, logprobs) * token_mask * logprobs


def ppo_clip_objective(ratio, clipped_ratio, advantages) -> Tensor:
    """Per-token PPO-clip surrogate min(r·A, r̂·A) (GRPO and DAPO): zero gradient where the clip binds."""
    a = _broadcast(advantages, ratio)
    return (ratio * a).minimum(clipped_ratio * a)


# ---------------------------------------------------------------- the losses, each registered once

@LOSSES.register("cispo", normalization="group", needs_eps_low=False)
def cispo_token_loss(logprobs, old_logprobs, advantages, mask, *, group_index, cfg):
    """M1 Eq. 4–5, J = E_q[ 1/Σ_i|o_i| · Σ_i Σ_t sg(r̂_t) · A_i · log π_θ(o_t|·) ]: every token keeps
    sg(r̂)·A·∇log π; no lower bound unless ε_low is given. The 'group' normalization is the 1/Σ_i|o_i|."""
    ratio, weight = clipped_is_weight(logprobs, old_logprobs, eps_high=cfg.eps_high, eps_low=cfg.eps_low)
    return -masked_objective(logprobs, weight, advantages, 1.0), clipped(ratio, weight)


@LOSSES.register("cispo_masked", normalization="group", needs_eps_low=False)
def cispo_masked_token_loss(logprobs, old_logprobs, advantages, mask, *, group_index, cfg):
    """Eq. 6–7: CISPO's weight with PPO-clip's token mask."""
    ratio, weight = clipped_is_weight(logprobs, old_logprobs, eps_high=cfg.eps_high, eps_low=cfg.eps_low)
    m = ppo_token_mask(ratio, advantages, eps_high=cfg.eps_high, eps_low=cfg.eps_low)
    return -masked_objective(logprobs, weight, advantages, m), clipped(ratio, weight)


def _ppo_clip_token_loss(logprobs, old_logprobs, advantages, mask, *, group_index, cfg):
    ratio, weight = clipped_is_weight(logprobs, old_logprobs, eps_high=cfg.eps_high, eps_low=cfg.eps_low)
    return -ppo_clip_objective(ratio, weight, advantages), clipped(ratio, weight)


# The PPO-clip losses differ only in the normalization and ε a recipe sets (GRPO: sequence mean;
# DAPO: token mean with ε_low 0.2, ε_high 0.28); each needs ε_low because it clips from below.
LOSSES.register("grpo", normalization="sequence", needs_eps_low=True)(_ppo_clip_token_loss)
LOSSES.register("dapo", normalization="token", needs_eps_low=True)(_ppo_clip_token_loss)
LOSSES.register("ppo", normalization="token", needs_eps_low=True)(_ppo_clip_token_loss)


# ---------------------------------------------------------------- normalizations: Σ w_t·ℓ_t is the loss

@NORMALIZATIONS.register("group")
def _group_weights(mask, group_index=None):
    """M1 Eq. 4: 1/Σ_i|o_i| within each prompt group, then the mean over groups (no group_index: one group)."""
    if group_index is None:
        return _token_weights(mask)
    groups, inverse = group_index.unique(return_inverse=True)
    row_tokens = mask.sum(1)
    group_tokens = row_tokens.new_zeros(len(groups)).index_add_(0, inverse, row_tokens)
    return mask / group_tokens[inverse].clamp(min=1).unsqueeze(1) / (group_tokens > 0).sum().clamp(min=1)


@NORMALIZATIONS.register("token")
def _token_weights(mask, group_index=None):
    """The batch's token mean (DAPO), so long responses weigh more."""
    return mask / mask.sum().clamp(min=1)


@NORMALIZATIONS.register("sequence")
def _sequence_weights(mask, group_index=None):
    """Each response's token mean, then the mean over responses (GRPO), so each counts once."""
    row_tokens = mask.sum(1, keepdim=True)
    return mask / row_tokens.clamp(min=1) / (row_tokens > 0).sum().clamp(min=1)


@NORMALIZATIONS.register("sample_token")
def _sample_token_weights(mask, group_index=None):
    """The mean of `sequence` and `token`: M1's 80k stage combines a sample-level loss with token-level
    normalization but gives no formula; this is our reading of it."""
    return (_sequence_weights(mask) + _token_weights(mask)) / 2


def token_weights(mask, normalization: str, group_index=None) -> Tensor:
    """Per-token weights w [B, T] with Σ w_t·ℓ_t the normalized loss, so a batch split into
    micro-batches and ranks sums back to exactly the whole-batch value. Fully masked rows and empty
    groups do not count in the means. Raises ValueError for an unknown normalization."""
    return NORMALIZATIONS[normalization].fn(mask.float(), group_index)


def normalize(per_token, mask, normalization: str, group_index=None) -> Tensor:
    """Reduce masked per-token losses to a scalar (see `token_weights`)."""
    return (per_token * token_weights(mask, normalization, group_index).to(per_token.dtype)).sum()


def policy_loss(name: str, logprobs, old_logprobs, advantages, mask, *, eps_high: float,
                eps_low: float | None = None, normalization: str | None = None, group_index=None,
                search=()) -> Tensor:
    """−J [] for the loss `name` (`resolve`), reduced with `normalization` (`token_weights`; default the
    loss's own), as the trainer computes it on one whole minibatch. ValueError for an unknown name."""
    cfg = LossConfig(name=name, eps_high=eps_high, eps_low=eps_low, normalization=normalization)
    per_token, _ = resolve(name, search)(logprobs, old_logprobs, advantages, mask, group_index=group_index, cfg=cfg)
    return normalize(per_token, mask, cfg.normalization, group_index)


def cispo_loss(logprobs, old_logprobs, advantages, mask, *, eps_high: float, eps_low: float | None = None,
               group_index=None) -> Tensor:
    """−J_CISPO (Eq. 4–5): −1/Σ_i|o_i| · Σ_i Σ_t sg(r̂_t) · A_i · log π_θ(o_t).

    With `group_index`, each prompt group is normalized by its own response tokens and groups are
    averaged; without, by the batch's response tokens.
    """
    return policy_loss("cispo", logprobs, old_logprobs, advantages, mask, eps_high=eps_high, eps_low=eps_low,
                       normalization="group", group_index=group_index)


PPO_REFERENCE_EPS = (0.2, 0.28)  # (ε_low, ε_high) of DAPO's clip-higher: where fork tokens are counted


def policy_health(logprobs, old_logprobs, advantages, mask, entropy, *, token_ids=None) -> dict:
    """Per-update health figures over response tokens, whatever the loss (no gradient), floats but for
    the one Counter; a loss reports its own figures (e.g. clip_fraction) beside these.

    ppo_zeroed_fraction is the share of tokens Eq. 7's mask zeroes at DAPO's ε (ε_low 0.2, ε_high 0.28),
    whatever ε the run's own loss uses: the high-ratio "fork" tokens PPO-clip would drop and CISPO keeps
    (at CISPO's own cap of 1 + 4 the mask would almost never bind, hiding them). With `token_ids` [B, T] (the target token of each
    position), ppo_zeroed_tokens counts those tokens by id, to show which tokens they are. approx_kl
    is k3 = (r − 1) − log r, an unbiased estimate of KL(π_old ‖ π_θ) from tokens sampled by π_old.
    """
    on = mask.bool()
    if not on.any():  # a minibatch of fully masked responses (e.g. overlong "mask") has nothing to report
        return {}
    ratio = (logprobs.detach() - old_logprobs).exp()
    r = ratio[on]
    zeroed = 1 - ppo_token_mask(ratio, advantages, eps_high=PPO_REFERENCE_EPS[1], eps_low=PPO_REFERENCE_EPS[0])[on]
    figures = {
        "ppo_zeroed_fraction": float(zeroed.mean()),
        "is_weight_mean": float(r.mean()),
        "is_weight_max": float(r.max()),
        "entropy": float(entropy.detach()[on].mean()),
        "approx_kl": float(((r - 1) - r.log()).mean()),
    }
    if token_ids is not None:
        figures["ppo_zeroed_tokens"] = Counter(token_ids[on][zeroed.bool()].tolist())
    return figures


# Losses kept in files of their own register themselves when imported; each is imported here, once.
from cispo import gspo  # noqa: E402,F401  (after LOSSES exists: gspo.py registers into it)
