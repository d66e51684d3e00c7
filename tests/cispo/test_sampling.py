"""Overlong handling and dynamic sampling: what the controller gets back and what it is told."""
import pytest
import torch

from cispo.sampling import dynamic_sample, overlong

REASONS = ["stop", "length", "repetition", "stop"]
LENGTHS = [50, 100, 60, 90]


def test_overlong_modes():
    rewards = torch.tensor([1.0, 1.0, 0.5, 1.0])
    kept, keep = overlong(rewards, REASONS, LENGTHS, mode="none", max_new_tokens=100)
    assert torch.equal(kept, rewards) and keep.all()
    zeroed, keep = overlong(rewards, REASONS, LENGTHS, mode="zero", max_new_tokens=100)
    assert zeroed.tolist() == [1.0, 0.0, 0.0, 1.0] and keep.all()
    same, keep = overlong(rewards, REASONS, LENGTHS, mode="mask", max_new_tokens=100)
    assert torch.equal(same, rewards) and keep.tolist() == [True, False, False, True]


def test_soft_overlong_penalty_ramps_over_the_buffer():
    # DAPO Eq. 13 with budget 100 and a 20-token buffer: 0 up to 80 tokens, then linear down to −penalty.
    rewards, _ = overlong(torch.ones(4), REASONS, LENGTHS, mode="soft", max_new_tokens=100, buffer=20, penalty=0.5)
    assert rewards.tolist() == pytest.approx([1.0, 0.5, 0.5, 1 - 0.5 * 10 / 20])


def test_unknown_overlong_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, zero, mask, soft"):
        overlong(torch.ones(4), REASONS, LENGTHS, mode="drop", max_new_tokens=100)


def _groups(*rewards):
    return [torch.tensor(r, dtype=torch.float32) for r in rewards]


def test_dynamic_sampling_drops_zero_spread_groups_and_refills():
    asked = []
    pool = iter(_groups([1, 1], [0, 1], [0, 0], [1, 0], [0.5, 1], [1, 0]))

    def draw(k):
        asked.append(k)
        return [next(pool) for _ in range(k)]

    first = _groups([1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 1])
    batch, stats = dynamic_sample(first, draw, rewards=lambda g: g, target=4, max_draws=3)
    assert len(batch) == 4 and all(g.max() > g.min() for g in batch)
    assert batch[:2] == first[1::2]  # kept groups keep their order, refills follow
    # 2 of 4 kept so far: the first draw asks for 2 / (3/5) -> 4; of those 2 have spread.
    assert asked == [4]
    assert stats == {"groups_dropped": 4, "groups_refilled": 2, "groups_unused": 0, "sampling_draws": 1}


def test_dynamic_sampling_stops_after_max_draws():
    calls = []

    def draw(k):
        calls.append(k)
        return _groups(*[[1, 1]] * k)  # every prompt solved by every sample

    batch, stats = dynamic_sample(_groups([0, 0], [0, 1]), draw, rewards=lambda g: g, target=4, max_draws=2)
    assert len(batch) == 1 and len(calls) == 2 and max(calls) <= 4
    assert stats["sampling_draws"] == 2 and stats["groups_refilled"] == 0 and stats["groups_dropped"] == 1 + sum(calls)
    assert dynamic_sample(_groups([1, 1]), draw, rewards=lambda g: g, target=4, max_draws=0)[0] == []
