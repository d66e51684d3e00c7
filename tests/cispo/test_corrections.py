"""Each mismatch correction against a hand-computed case (cispo.corrections)."""
import math
import warnings

import pytest
import torch

from cispo.corrections import CorrectionConfig, correction_factor, mismatch_figures, staleness_histogram
from cispo.config import RecipeError, load_recipe

# Four response tokens and one pad: ρ = π_old/μ = 0.25, 1, 3, 8 on the mask.
ROLLOUT = torch.zeros(1, 5)
TRAINER = torch.tensor([[math.log(0.25), 0.0, math.log(3.0), math.log(8.0), 5.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])


def test_tis_truncates_the_ratio_at_its_cap():
    factor = correction_factor(CorrectionConfig(correction="tis", tis_cap=2.0), TRAINER, ROLLOUT, MASK)
    assert factor[0].tolist() == pytest.approx([0.25, 1.0, 2.0, 2.0, 1.0], rel=1e-6)


def test_icepop_zeroes_tokens_outside_its_band():
    factor = correction_factor(CorrectionConfig(correction="icepop", icepop_band=(0.5, 5.0)), TRAINER, ROLLOUT, MASK)
    assert factor.tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]


def test_no_correction_is_one_and_a_recipe_is_checked(tmp_path):
    assert correction_factor(CorrectionConfig(), TRAINER, ROLLOUT, MASK).tolist() == [[1.0] * 5]
    with pytest.raises(RecipeError, match="algorithm.correction"):
        load_recipe("recipes/tiny-arith.yaml", ["algorithm.correction=tsi"])
    with pytest.raises(RecipeError, match="set algorithm.old_logprobs=recompute"):
        load_recipe("recipes/tiny-arith.yaml", ["algorithm.correction=tis"])
    with pytest.warns(UserWarning, match="plain REINFORCE"):
        load_recipe("recipes/tiny-arith.yaml", ["algorithm.updates_per_batch=1", "algorithm.old_logprobs=recompute"])
    stale = ["rollout.overlap=true", "rollout.partial_tokens=4", "rollout.max_new_tokens=8", "rollout.max_staleness=2"]
    with pytest.warns(UserWarning, match="algorithm.name=cispo_masked"):
        load_recipe("recipes/tiny-arith.yaml", stale)
    with warnings.catch_warnings():  # one version old, or the masked loss: no warning
        warnings.simplefilter("error")
        separate = "resources.colocate=false"  # colocated, overlap would warn that it saves no time
        load_recipe("recipes/tiny-arith.yaml", ["rollout.overlap=true", "rollout.max_staleness=1", separate])
        load_recipe("recipes/tiny-arith.yaml", [*stale, "algorithm.name=cispo_masked", "algorithm.eps_low=0.2", separate])


def test_the_factor_carries_no_gradient():
    trainer = TRAINER.clone().requires_grad_(True)
    assert not correction_factor(CorrectionConfig(correction="tis"), trainer, ROLLOUT, MASK).requires_grad


def test_mismatch_figures_by_hand():
    factor = correction_factor(CorrectionConfig(correction="icepop"), TRAINER, ROLLOUT, MASK)
    figures = mismatch_figures(TRAINER, ROLLOUT, MASK, factor)
    ratios = [0.25, 1.0, 3.0, 8.0]
    k3 = sum(r - 1 - math.log(r) for r in ratios) / 4
    assert figures["mismatch_kl"] == pytest.approx(k3, rel=1e-6)  # float32 log-probs
    # |log ρ| sorted: 0, log 3, log 4, log 8; the 0.99 quantile interpolates 97% of the way from log 4 to log 8.
    assert figures["mismatch_logprob_p99"] == pytest.approx(math.log(4) + 0.97 * (math.log(8) - math.log(4)), rel=1e-6)
    assert figures["correction_fraction"] == 0.5
    # TIS (cap 2) touches only the ratios over its cap, 3 and 8: a weight it passes through unchanged is not counted.
    tis = correction_factor(CorrectionConfig(correction="tis"), TRAINER, ROLLOUT, MASK)
    assert mismatch_figures(TRAINER, ROLLOUT, MASK, tis)["correction_fraction"] == 0.5
    assert mismatch_figures(TRAINER, ROLLOUT, torch.zeros_like(MASK), factor) == {}


def test_staleness_histogram_counts_response_tokens_by_age():
    versions = torch.tensor([[7, 7, 6, 4, 0]])
    assert staleness_histogram(versions, MASK, current_version=7) == {"staleness_0": 2, "staleness_1": 1,
                                                                      "staleness_3": 1}


def test_tis_scales_each_tokens_cispo_gradient_by_hand():
    # The ranks' loss is Σ_t w_t · c_t · ℓ_t (cispo.trainer): with π_θ = π_old (the first update) CISPO's weight
    # is 1, so token t's gradient is −c_t · A / N, c_t = min(π_old/μ, 2) = 0.25, 1, 2, 2 on the mask.
    from cispo.loss import LOSSES, LossConfig, token_weights

    cfg = LossConfig(name="cispo", eps_high=4.0)
    logp = TRAINER.clone().requires_grad_(True)
    factor = correction_factor(CorrectionConfig(correction="tis", tis_cap=2.0), TRAINER, ROLLOUT, MASK)
    per_token, _ = LOSSES["cispo"].fn(logp, TRAINER, torch.tensor([0.5]), MASK, group_index=None, cfg=cfg)
    (per_token * token_weights(MASK, "group") * factor).sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-0.25 * 0.5 / 4, -0.5 / 4, -2 * 0.5 / 4, -2 * 0.5 / 4, 0.0])
