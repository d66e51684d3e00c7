"""Each mismatch correction against a hand-computed case (cispo.corrections)."""
import math

import pytest
import torch

from cispo.corrections import correction_factor, mismatch_figures, staleness_histogram

# Four response tokens and one pad: ρ = π_old/μ = 0.25, 1, 3, 8 on the mask.
ROLLOUT = torch.zeros(1, 5)
TRAINER = torch.tensor([[math.log(0.25), 0.0, math.log(3.0), math.log(8.0), 5.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])


def test_tis_truncates_the_ratio_at_its_cap():
    factor = correction_factor("tis", TRAINER, ROLLOUT, MASK, tis_cap=2.0)
    assert factor[0].tolist() == pytest.approx([0.25, 1.0, 2.0, 2.0, 1.0], rel=1e-6)


def test_icepop_zeroes_tokens_outside_its_band():
    factor = correction_factor("icepop", TRAINER, ROLLOUT, MASK, icepop_band=(0.5, 5.0))
    assert factor.tolist() == [[0.0, 1.0, 1.0, 0.0, 1.0]]


def test_no_correction_is_one_and_an_unknown_name_is_refused():
    assert correction_factor("none", TRAINER, ROLLOUT, MASK).tolist() == [[1.0] * 5]
    with pytest.raises(KeyError, match="valid: none, tis, icepop"):
        correction_factor("tsi", TRAINER, ROLLOUT, MASK)


def test_the_factor_carries_no_gradient():
    trainer = TRAINER.clone().requires_grad_(True)
    assert not correction_factor("tis", trainer, ROLLOUT, MASK).requires_grad


def test_mismatch_figures_by_hand():
    factor = correction_factor("icepop", TRAINER, ROLLOUT, MASK)
    figures = mismatch_figures(TRAINER, ROLLOUT, MASK, factor)
    ratios = [0.25, 1.0, 3.0, 8.0]
    k3 = sum(r - 1 - math.log(r) for r in ratios) / 4
    assert figures["mismatch_kl"] == pytest.approx(k3, rel=1e-6)  # float32 log-probs
    # |log ρ| sorted: 0, log 3, log 4, log 8; the 0.99 quantile interpolates 97% of the way from log 4 to log 8.
    assert figures["mismatch_logprob_p99"] == pytest.approx(math.log(4) + 0.97 * (math.log(8) - math.log(4)), rel=1e-6)
    assert figures["correction_fraction"] == 0.5
    assert mismatch_figures(TRAINER, ROLLOUT, torch.zeros_like(MASK), factor) == {}


def test_staleness_histogram_counts_response_tokens_by_age():
    versions = torch.tensor([[7, 7, 6, 4, 0]])
    assert staleness_histogram(versions, MASK, current_version=7) == {"staleness_0": 2, "staleness_1": 1,
                                                                      "staleness_3": 1}
