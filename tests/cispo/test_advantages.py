"""Advantages (M1 Eq. 2 and its variants), checked against the formulas written out by hand."""
import pytest
import torch

from cispo.advantages import advantages, group_advantages

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5])
GROUP = torch.tensor([7, 7, 7, 3, 3, 9, 9, 9])  # group ids need not be sorted or contiguous


def test_eq2_uses_group_mean_and_unbiased_std():
    a = group_advantages(REWARDS, GROUP)
    first = REWARDS[:3]
    expected = (first - first.mean()) / first.std()  # torch's std is the unbiased one
    assert torch.allclose(a[:3], expected, atol=1e-5)
    assert torch.equal(a[3:], torch.zeros(5))  # groups whose rewards agree carry no signal


def test_no_std_only_centres():
    a = advantages(REWARDS, GROUP, "no_std")
    assert torch.allclose(a[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_leave_one_out_subtracts_the_mean_of_the_others():
    rewards, group = torch.tensor([3.0, 1.0, 2.0, 6.0, 4.0]), torch.tensor([0, 0, 0, 1, 1])
    expected = torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0, 6 - 4.0, 4 - 6.0])
    assert torch.allclose(advantages(rewards, group, "leave_one_out"), expected)


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: group_std, no_std, leave_one_out"):
        advantages(REWARDS, GROUP, "gae")


@pytest.mark.parametrize("estimator", ["group_std", "no_std", "leave_one_out"])
def test_a_group_whose_rewards_all_agree_gets_exactly_zero(estimator):
    """fp32 means of equal non-binary rewards are off by a few ulps (8 x 0.65, 64 x 9.55); divided by the
    group's near-zero std that residue used to become A = -0.056 and +0.86."""
    rewards = torch.tensor([0.65] * 8 + [9.55] * 64 + [0.1 + 0.2] * 3 + [0.3, 0.3 + 1e-6, 0.3])
    group = torch.tensor([0] * 8 + [1] * 64 + [2] * 3 + [3] * 3)
    a = advantages(rewards, group, estimator)
    assert torch.equal(a[:75], torch.zeros(75))
    assert (a[75:] != 0).all() and a[76] > 0 > a[75]  # a real spread, however small, still counts


@pytest.mark.parametrize("estimator", ["group_std", "no_std", "leave_one_out"])
def test_a_sandbox_failure_is_left_out_of_its_groups_baseline(estimator):
    """verl PR #6375: [1, 1, 1, 0] where the 0 is a sandbox failure got [0.5, 0.5, 0.5, -1.5]; the three real
    outcomes agree, so they carry no signal, and the failure itself gets 0 (it gets no loss either)."""
    rewards, group = torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.zeros(4, dtype=torch.long)
    valid = torch.tensor([True, True, True, False])
    assert advantages(rewards, group, estimator).abs().sum() > 0  # counted, the failure makes a spread
    assert torch.equal(advantages(rewards, group, estimator, valid=valid), torch.zeros(4))


def test_the_baseline_is_that_of_the_valid_rewards_alone():
    """Ours, same class: a group with a spread keeps its statistics over the real outcomes only: the mean,
    the std and RLOO's G/(G-1) see three responses, not four; a group with one valid response has no spread."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    valid = torch.tensor([True, True, True, False, True, False, False])
    real = rewards[:3]
    assert torch.allclose(advantages(rewards, group, valid=valid),
                          torch.cat([(real - real.mean()) / real.std(), torch.zeros(4)]), atol=1e-5)
    assert torch.allclose(advantages(rewards, group, "leave_one_out", valid=valid),
                          torch.tensor([1 - 0.0, 0 - 0.5, 0 - 0.5, 0, 0, 0, 0]))
