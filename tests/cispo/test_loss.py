"""The defining properties of the loss family (M1 §3.1) and of the chunked fp32 logprobs it consumes."""
import pytest
import torch

from cispo.config import Recipe, RecipeError, load_recipe
from cispo.loss import (LOSSES, LossConfig, clipped_is_weight, cispo_loss, masked_objective, normalize, policy_health,
                        policy_loss, ppo_token_mask)
from rollout.model import token_logprobs


def _grad(name, logp, old, adv, mask, **kw):
    logp = logp.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(policy_loss(name, logp, old, adv, mask, **kw), logp)
    return g


def _random_batch(seed=0, rows=8, width=12):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, width, generator=g) * 3
    logp = old + torch.randn(rows, width, generator=g) * 0.6  # ratios from ~0.2 to ~5: both clips bind
    adv = torch.randn(rows, generator=g)
    lengths = torch.randint(3, width + 1, (rows,), generator=g)
    mask = (torch.arange(width) < lengths[:, None]).float()
    return logp, old, adv, mask


def test_cispo_keeps_the_fork_token_gradient_that_ppo_clip_zeroes():
    # Token 1 has A > 0 and r = e > 1 + ε_high: PPO-clip drops it, CISPO keeps sg(r̂)·A/N with r̂ = 1 + ε_high.
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.0, 1.0, -0.1, 0.05]])
    adv, mask, eps_high = torch.tensor([0.7]), torch.ones(1, 4), 0.28
    n = mask.sum()
    cispo = _grad("cispo", logp, old, adv, mask, eps_high=eps_high)
    ppo = _grad("grpo", logp, old, adv, mask, eps_high=eps_high, eps_low=0.2, normalization="token")
    # The loss is −J, so its gradient is −sg(r̂)·A/N.
    assert cispo[0, 1].item() == pytest.approx(-(1 + eps_high) * 0.7 / n.item(), rel=1e-6)
    assert ppo[0, 1].item() == 0.0
    assert ppo[0, 0].item() == pytest.approx(-0.7 / n.item(), rel=1e-6)  # an unclipped token: r·A/N, r = 1


def test_cispo_has_no_lower_bound_by_default():
    old, logp = torch.zeros(1, 2), torch.tensor([[-3.0, 0.0]])  # r = e^-3 on token 0
    g = _grad("cispo", logp, old, torch.tensor([-1.0]), torch.ones(1, 2), eps_high=0.28)
    assert g[0, 0].item() == pytest.approx(torch.exp(torch.tensor(-3.0)).item() / 2, rel=1e-6)


@pytest.mark.parametrize("name,eps_low,eps_high,normalization", [("grpo", 0.2, 0.2, "sequence"),
                                                                ("dapo", 0.2, 0.28, "token")])
def test_unified_mask_with_unclipped_weight_reproduces_ppo_clip_gradient(name, eps_low, eps_high, normalization):
    logp, old, adv, mask = _random_batch()
    ppo = _grad(name, logp, old, adv, mask, eps_high=eps_high, eps_low=eps_low, normalization=normalization)
    leaf = logp.clone().requires_grad_(True)
    ratio = torch.exp(leaf - old)
    m = ppo_token_mask(ratio, adv, eps_high=eps_high, eps_low=eps_low)
    unified = normalize(-masked_objective(leaf, ratio, adv, m), mask, normalization)  # Eq. 6 with r̂ = r
    (g,) = torch.autograd.grad(unified, leaf)
    on = mask.bool()
    assert 0 < (m[on] == 0).sum() < on.sum()  # both masked and unmasked tokens are exercised
    assert (g - ppo).abs().max() < 1e-6


def test_cispo_masked_is_cispo_with_ppo_tokens_dropped():
    logp, old, adv, mask = _random_batch(seed=1)
    kw = dict(eps_high=0.28, eps_low=0.2)
    m = ppo_token_mask(torch.exp(logp - old), adv, **kw).bool()
    cispo, masked = _grad("cispo", logp, old, adv, mask, **kw), _grad("cispo_masked", logp, old, adv, mask, **kw)
    assert torch.equal(masked[m], cispo[m]) and (masked[~m] == 0).all() and (cispo[~m & mask.bool()] != 0).all()


def test_group_and_token_normalization_agree_only_for_equal_lengths():
    logp, old, adv, _ = _random_batch(seed=2)
    group = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])  # G = 2 responses per prompt
    kw = dict(eps_high=0.28, group_index=group)
    equal = torch.ones_like(logp)
    assert policy_loss("cispo", logp, old, adv, equal, normalization="group", **kw).item() == pytest.approx(
        policy_loss("cispo", logp, old, adv, equal, normalization="token", **kw).item(), rel=1e-6)
    ragged = equal.clone()
    ragged[0, 4:] = 0
    assert abs(policy_loss("cispo", logp, old, adv, ragged, normalization="group", **kw)
               - policy_loss("cispo", logp, old, adv, ragged, normalization="token", **kw)) > 1e-3


def test_normalizations_match_their_formulas():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [5.0, 6.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0], [0, 0, 0]])  # row 2 is fully masked and must not count
    group = torch.tensor([0, 0, 1])
    assert normalize(per_token, mask, "token").item() == pytest.approx(10 / 4)
    assert normalize(per_token, mask, "sequence").item() == pytest.approx((2 + 4) / 2)
    assert normalize(per_token, mask, "sample_token").item() == pytest.approx((10 / 4 + 3) / 2)
    assert normalize(per_token, mask, "group", group).item() == pytest.approx(10 / 4)  # group 1 is empty
    assert normalize(per_token, mask, "group").item() == pytest.approx(10 / 4)  # no groups: one group


def test_cispo_loss_is_the_paper_default_of_policy_loss():
    logp, old, adv, mask = _random_batch(seed=3)
    group = torch.arange(8) // 4
    for g, norm in ((group, "group"), (None, "token")):
        paper = policy_loss("cispo", logp, old, adv, mask, eps_high=4.0, normalization=norm, group_index=group)
        assert torch.equal(cispo_loss(logp, old, adv, mask, eps_high=4.0, group_index=g), paper)


def test_unknown_names_list_the_valid_ones():
    logp, old, adv, mask = _random_batch()
    with pytest.raises(ValueError, match="valid: cispo, cispo_masked, grpo, dapo, ppo, gspo or 'module:function'"):
        policy_loss("reinforce", logp, old, adv, mask, eps_high=0.2)
    with pytest.raises(ValueError, match="valid: group, token, sequence, sample_token"):
        policy_loss("cispo", logp, old, adv, mask, eps_high=0.2, normalization="batch")


def test_recipe_selects_every_loss_and_explains_bad_names(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algorithm: {eps_high: 0.28}\n")
    assert load_recipe(recipe).algorithm.normalization == "group"
    assert load_recipe(recipe, ["algorithm.name=grpo", "algorithm.eps_low=0.2"]).algorithm.normalization == "sequence"
    assert load_recipe(recipe, ["algorithm.name=gspo", "algorithm.eps_low=3e-4"]).algorithm.normalization == "sequence"
    assert load_recipe(recipe, ["algorithm.name=dapo", "algorithm.eps_low=0.2",
                                "algorithm.normalization=sample_token"]).algorithm.normalization == "sample_token"
    with pytest.raises(RecipeError, match="algorithm.name.*unknown loss 'reinforce'; valid: cispo, .*, gspo or 'module:function'"):
        load_recipe(recipe, ["algorithm.name=reinforce"])
    with pytest.raises(RecipeError, match="algorithm.eps_low.*state eps_low"):
        load_recipe(recipe, ["algorithm.name=dapo"])
    with pytest.raises(RecipeError, match="algorithm.eps_low.*state eps_low"):
        load_recipe(recipe, ["algorithm.name=gspo"])
    assert Recipe.model_validate({"algorithm": {"eps_high": 4.0}}).algorithm.eps_low is None  # M1: no lower bound
    # A user's loss is checked for its form here and imported where it runs (tests/cispo/test_user_loss.py).
    user = load_recipe(recipe, ["algorithm.name=my_losses:reinforce"])
    assert user.algorithm.normalization == "token" and user.algorithm.loss_section().name == "my_losses:reinforce"
    with pytest.raises(RecipeError, match=r"key 'algorithm.name' = 'my_losses:reinforce': module 'my_losses' cannot be imported"):
        user.loss()


def test_every_loss_reports_its_clip_fraction():
    logp, old, adv, mask = _random_batch()
    for name in LOSSES:
        cfg = LossConfig(name=name, eps_high=0.28, eps_low=0.2)
        per_token, figures = LOSSES[name].fn(logp, old, adv, mask, group_index=torch.arange(8), cfg=cfg)
        assert per_token.shape == logp.shape and figures["clip_fraction"].shape == logp.shape
        assert 0 < figures["clip_fraction"][mask.bool()].mean() < 1, name  # both clipped and unclipped


def test_gspo_gives_every_token_of_a_response_its_sequence_ratio_gradient():
    # Row 0: s = exp(mean(0.1, -0.3)) = e^-0.1 ≈ 0.905 inside the clip with ε = 0.2: each of its two tokens gets
    # ∂(−J)/∂logπ_t = −(1/N)·A·s/|y| with N = 2 responses. Row 1: s = e^0.5 > 1.2 with A > 0: clipped, no gradient.
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, -0.3, 5.0], [0.5, 0.5, 0.5]], requires_grad=True)  # 5.0 is padding
    adv, mask = torch.tensor([-1.5, 2.0]), torch.tensor([[1.0, 1, 0], [1, 1, 1]])
    loss = policy_loss("gspo", logp, old, adv, mask, eps_high=0.2, eps_low=0.2)
    (g,) = torch.autograd.grad(loss, logp)
    s = torch.exp(torch.tensor(-0.1))
    assert loss.item() == pytest.approx(-(s * -1.5 + 1.2 * 2.0).item() / 2, rel=1e-6)
    assert g[0, :2].tolist() == pytest.approx([(1.5 * s / 2 / 2).item()] * 2, rel=1e-6)
    assert g[0, 2] == 0 and (g[1] == 0).all()
    _, figures = LOSSES["gspo"].fn(logp, old, adv, mask, group_index=torch.arange(2),
                                   cfg=LossConfig(name="gspo", eps_high=0.2, eps_low=0.2))
    assert figures["clip_fraction"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_policy_health_counts_the_fork_tokens_cispo_keeps():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.0, 2.0, 0.5, 3.0]]))
    adv, mask = torch.tensor([1.0]), torch.tensor([[1.0, 1, 1, 0]])
    m = policy_health(logp, old, adv, mask, torch.ones(1, 4))
    assert m["ppo_zeroed_fraction"] == pytest.approx(1 / 3)  # r = 2 with A > 0; r = 3 is padding
    assert m["is_weight_max"] == pytest.approx(2.0)
    assert m["approx_kl"] > 0 and m["entropy"] == 1.0 and "ppo_zeroed_tokens" not in m
    ids = torch.tensor([[7, 8, 9, 8]])  # the token at r = 3 is padding, so only one 8 counts
    assert policy_health(logp, old, adv, mask, torch.ones(1, 4), token_ids=ids)["ppo_zeroed_tokens"] == {8: 1}
    assert policy_health(logp, old, adv, torch.zeros(1, 4), torch.ones(1, 4)) == {}
    # Counted at DAPO's ε whatever the run's own: CISPO's cap of 1 + 4 clips nothing here, yet r = 2 is a fork.
    cispo = LOSSES["cispo"].fn(logp, old, adv, mask, group_index=None, cfg=LossConfig(eps_high=4.0))[1]
    assert cispo["clip_fraction"].sum() == 0 and m["ppo_zeroed_fraction"] == pytest.approx(1 / 3)
    dapo = LOSSES["dapo"].fn(logp, old, adv, mask, group_index=None, cfg=LossConfig(name="dapo", eps_high=0.28, eps_low=0.2))[1]
    assert dapo["clip_fraction"][mask.bool()].mean() == pytest.approx(2 / 3)  # r = 2 and r = 0.5 clipped
    _, clipped = clipped_is_weight(logp, old, eps_high=0.28)
    assert clipped.max().item() == pytest.approx(1.28)


@pytest.mark.parametrize("with_entropy_grad", [False, True])
def test_chunked_logprobs_entropy_and_gradients_match_naive(with_entropy_grad):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 16, generator=g, requires_grad=True)
    weight = (torch.randn(97, 16, generator=g) * 0.5).requires_grad_(True)
    targets = torch.randint(0, 97, (3, 13), generator=g)
    up_logp, up_ent = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)

    def backprop(logp, entropy):
        loss = (logp * up_logp).sum() + ((entropy * up_ent).sum() if with_entropy_grad else 0)
        return torch.autograd.grad(loss, (hidden, weight))

    logits = (hidden @ weight.t()) / 0.7
    naive_all = torch.log_softmax(logits, -1)
    naive = naive_all.gather(-1, targets[..., None]).squeeze(-1)
    naive_entropy = -(naive_all.exp() * naive_all).sum(-1)
    chunked, entropy = token_logprobs(hidden, weight, targets, temperature=0.7, chunk_tokens=5)
    assert chunked.dtype == entropy.dtype == torch.float32
    assert (chunked - naive).abs().max() < 1e-5 and (entropy - naive_entropy).abs().max() < 1e-5
    for a, b in zip(backprop(chunked, entropy), backprop(naive, naive_entropy)):
        assert (a - b).abs().max() < 1e-5
