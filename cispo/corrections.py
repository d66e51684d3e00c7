"""Train/inference mismatch corrections: the sampler μ (the rollout engine) and the trainer's π_old are
different numerics of the same weights, or, with stale rollouts, different weights. A correction is a
per-token factor c_t ≥ 0 on the loss, computed from ρ_t = π_old(o_t)/μ(o_t) and detached:

    −J = Σ_t w_t · c_t · ℓ_t       (w_t: the loss's normalization; ℓ_t: the loss's per-token −J)

- `none`: c ≡ 1. M1's own choice: CISPO's capped weight against the rollout logprobs is the only weight.
- `tis`: truncated importance sampling, c = min(ρ, C) (Yao et al. 2025, "Your efficient RL framework
  secretly brings you off-policy RL training"; C = 2 as in verl and ms-swift).
- `icepop`: masked importance sampling, c = 1[α ≤ ρ ≤ β] (Ling team, IcePop, arXiv 2510.18855; [0.5, 5]).
  A masked token still counts in its normalization's denominator (slime#657 moved it out; we have not).

All tensors are [B, T] token grids with `mask` marking response tokens; log-probabilities are natural logs.
torch is not imported: only tensor methods are used.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

from pydantic import Field

from cispo.section import Section

if TYPE_CHECKING:
    from torch import Tensor


def no_correction(log_ratio: Tensor, *, tis_cap: float, icepop_band: tuple[float, float]) -> Tensor:
    """c ≡ 1 (M1)."""
    return log_ratio.new_ones(log_ratio.shape)


def truncated_is(log_ratio: Tensor, *, tis_cap: float, icepop_band: tuple[float, float]) -> Tensor:
    """TIS: c_t = min(π_old/μ, C)."""
    return log_ratio.exp().clamp(max=tis_cap)


def icepop(log_ratio: Tensor, *, tis_cap: float, icepop_band: tuple[float, float]) -> Tensor:
    """IcePop: c_t = 1 if α ≤ π_old/μ ≤ β, else 0 (the token keeps no gradient)."""
    ratio = log_ratio.exp()
    low, high = icepop_band
    return ((ratio >= low) & (ratio <= high)).to(log_ratio.dtype)


CORRECTIONS: dict[str, Callable[..., Tensor]] = {"none": no_correction, "tis": truncated_is, "icepop": icepop}


class CorrectionConfig(Section):
    """The mismatch correction's keys (under `algorithm` in a recipe): what each trainer rank reads."""
    correction: Literal["none", "tis", "icepop"] = Field(
        "none", description="train/inference mismatch correction against the rollout logprobs μ (needs "
        "old_logprobs: recompute): none (M1), tis: min(π_old/μ, tis_cap), icepop: drop tokens whose π_old/μ "
        "leaves icepop_band (cispo/corrections.py)")
    tis_cap: float = Field(2.0, gt=0, description="tis: the cap C of the truncated IS weight")
    icepop_band: tuple[float, float] = Field((0.5, 5.0), description="icepop: the band [α, β] of π_old/μ kept")

    def correction_section(self) -> CorrectionConfig:
        return CorrectionConfig(**self.model_dump(include=set(CorrectionConfig.model_fields)))


def correction_factor(cfg: CorrectionConfig, trainer_logprobs: Tensor, rollout_logprobs: Tensor,
                      mask: Tensor) -> Tensor:
    """The detached factor c [B, T] of correction `cfg.correction` (1 off the mask)."""
    log_ratio = (trainer_logprobs - rollout_logprobs).detach() * mask
    factor = CORRECTIONS[cfg.correction](log_ratio, tis_cap=cfg.tis_cap, icepop_band=cfg.icepop_band)
    return factor * mask + (1 - mask)


def mismatch_figures(trainer_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, factor: Tensor) -> dict:
    """Per-step mismatch figures over response tokens (floats):

    - mismatch_kl: KL(μ ‖ π_old) by the k3 estimator from tokens sampled by μ: E_μ[(ρ − 1) − log ρ];
    - mismatch_logprob_p99: the 99th percentile of |log π_old − log μ|;
    - correction_fraction: the share of tokens the correction touched: its factor is neither 1 nor the plain
      IS weight ρ (TIS: ρ over the cap; IcePop: ρ outside the band; none: no token).
    Empty when no token is on the mask.
    """
    on = mask.bool()
    if not on.any():
        return {}
    log_ratio = (trainer_logprobs - rollout_logprobs).detach()[on]
    c = factor[on]
    touched = (c != 1) & (c != log_ratio.exp())  # ρ as correction_factor computes it, so an untouched TIS weight is equal
    log_ratio = log_ratio.double()
    return {"mismatch_kl": float((log_ratio.exp() - 1 - log_ratio).mean()),
            "mismatch_logprob_p99": float(log_ratio.abs().quantile(0.99)),
            "correction_fraction": float(touched.double().mean())}


def staleness_histogram(versions: Tensor, mask: Tensor, current_version: int) -> dict:
    """Token counts by staleness (current_version − the version that sampled the token), as
    {"staleness_0": n0, "staleness_1": n1, ...} over response tokens."""
    ages = (current_version - versions[mask.bool()]).long()
    return {f"staleness_{age}": int(n) for age, n in enumerate(ages.bincount().tolist()) if n}
