"""Why stale rollouts collapsed tiny-countdown at staleness 2 (issue 19, README "Asynchronous rollouts at
staleness 2"): a token the current policy already made less likely than the sampler did keeps losing
probability under M1's capped CISPO weight, in expectation over the sampler's draws, while the masked
loss (Eq. 6-7) with ε_low stops the push. Hand-computed on a two-token vocabulary: <eos> and one other."""
import pytest
import torch

from cispo.loss import LOSSES, LossConfig

MU_EOS = 0.997  # the sampler's P(<eos>) two versions ago: the other token is drawn 3 times in 1000
PI_EOS = 0.75   # the current policy's, already lowered (π/μ = 0.752, under 1 - ε_low = 0.8)
ADVANTAGE = -1.0  # a wrong answer: continuing instead of ending is wrong too, so A is the same after either token


def _expected_step_on_eos(name: str, mu_eos: float, **eps) -> float:
    """d/dz_eos of E_{o ~ μ}[ℓ(o)] for one wrong response's last token; negative means a descent step
    raises P(<eos>). The expectation is exact: both outcomes, weighted by the sampler's probabilities."""
    logits = torch.tensor([[torch.logit(torch.tensor(PI_EOS)).item(), 0.0]], requires_grad=True)  # [eos, other]
    logp = logits.log_softmax(-1).expand(2, 2).gather(1, torch.tensor([[0], [1]]))  # log π of each outcome [2, 1]
    mu = torch.tensor([[mu_eos], [1 - mu_eos]])
    cfg = LossConfig(name=name, **eps)
    per_token, _ = LOSSES[name].fn(logp, mu.log(), torch.full((2,), ADVANTAGE), torch.ones(2, 1),
                                   group_index=torch.zeros(2, dtype=torch.long), cfg=cfg)
    (mu * per_token).sum().backward()
    return logits.grad[0, 0].item()


def test_on_policy_the_expected_step_leaves_eos_alone():
    # Score-function identity: Σ_o π(o) ∇log π(o) = 0, so A's sign moves nothing when μ = π.
    assert _expected_step_on_eos("cispo", PI_EOS, eps_high=4.0) == pytest.approx(0.0, abs=1e-7)


def test_stale_samples_push_eos_down_under_the_capped_cispo_weight():
    # E = -A [μ_e·(π_e/μ_e)·(1 - π_e) + μ_o·min(π_o/μ_o, 5)·(-π_e)]: the other token's weight would be
    # 0.25/0.003 = 83 and is capped at 5, so the term that would restore <eos> is cut to 6%.
    expected = -ADVANTAGE * (PI_EOS * (1 - PI_EOS) - (1 - MU_EOS) * 5.0 * PI_EOS)
    assert _expected_step_on_eos("cispo", MU_EOS, eps_high=4.0) == pytest.approx(expected, rel=1e-4)
    assert expected > 0.17  # a descent step lowers P(<eos>), and more the lower it already is
    # Uncapped, the IS weight restores the balance in expectation (though a batch of ~100 wrong answers
    # draws the other token 0.3 times on average, so in practice the push is there either way).
    assert _expected_step_on_eos("cispo", MU_EOS, eps_high=1e6) == pytest.approx(0.0, abs=1e-5)


def test_the_masked_loss_stops_the_push_once_the_weight_falls_under_one_minus_eps_low():
    # Eq. 7 zeroes <eos> (A < 0, r = 0.752 < 0.8); the other token keeps its capped gradient, which raises <eos>.
    expected = -ADVANTAGE * -(1 - MU_EOS) * 5.0 * PI_EOS
    step = _expected_step_on_eos("cispo_masked", MU_EOS, eps_high=4.0, eps_low=0.2)
    assert step == pytest.approx(expected, rel=1e-4) and step < 0
