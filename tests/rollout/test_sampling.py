"""The device-side sampler: Philox's published answers, uniform draws, the right distribution, per-row streams."""
import pytest
import torch

from rollout.sampling import philox4x32, sample, seed_key, uniforms

M = 0xFFFFFFFF


@pytest.mark.parametrize("counter, key, expected", [
    # Known-answer vectors of Random123 (kat_vectors, philox4x32 with 10 rounds).
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([M, M, M, M], [M, M], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
])
def test_philox_matches_known_answers(counter, key, expected):
    assert philox4x32(torch.tensor([counter]), torch.tensor([key]))[0].tolist() == expected


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniforms_are_uniform_over_positions_samples_and_seeds():
    n = 200_000
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2**40 + 3, -5)]).repeat_interleave(n // 4, 0)
    index = torch.arange(n)
    u = uniforms(keys, index % 7, index // 7)
    assert u.dtype == torch.float64 and 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=50, min=0, max=1)
    # 50 bins, 49 degrees of freedom: 95.0 is the 0.9999 quantile.
    assert _chi_square(counts, torch.full((50,), 1 / 50, dtype=torch.float64)) < 95.0
    # Neighbouring counters are not correlated (a weak hash would fail this first).
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01


def _draw(logits, temperature=1.0, top_k=0, top_p=1.0, n=100_000, seed=3):
    rows = torch.arange(n)
    u = uniforms(torch.tensor([seed_key(seed)]).expand(n, 2), torch.zeros(n, dtype=torch.long), rows)
    batch = logits.expand(n, -1)
    filtered = rows if top_k or top_p < 1 else None
    return sample(batch, u, torch.full((n,), temperature), torch.full((n,), top_k), torch.full((n,), top_p), filtered)


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0, 0.2]])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_frequencies_match_the_tempered_distribution(temperature):
    tokens, logprobs = _draw(LOGITS, temperature)
    probs = torch.softmax(LOGITS[0].double() / temperature, -1)
    # 8 categories, 7 degrees of freedom: 29.9 is the 0.9999 quantile.
    assert _chi_square(torch.bincount(tokens, minlength=8).double(), probs) < 29.9
    assert torch.allclose(logprobs.double(), probs.log()[tokens], atol=1e-6)


def test_top_k_and_top_p_sample_the_renormalized_head_and_report_full_logprobs():
    probs = torch.softmax(LOGITS[0].double(), -1)
    tokens, logprobs = _draw(LOGITS, top_k=3)
    top3 = probs.topk(3).indices
    kept = torch.zeros(8, dtype=torch.float64).index_fill(0, top3, 1) * probs
    assert set(tokens.unique().tolist()) == set(top3.tolist())
    assert _chi_square(torch.bincount(tokens, minlength=8).double()[top3], (kept / kept.sum())[top3]) < 21.1  # df 2
    assert torch.allclose(logprobs.double(), probs.log()[tokens], atol=1e-6)  # full distribution, not renormalized
    # top_p=0.6 keeps the smallest prefix of the sorted distribution whose mass reaches 0.6.
    tokens, _ = _draw(LOGITS, top_p=0.6)
    order = probs.argsort(descending=True)
    needed = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    assert set(tokens.unique().tolist()) == set(order[:needed].tolist())


def test_greedy_rows_take_the_argmax_with_untempered_logprobs():
    logits = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    u = torch.rand(5, dtype=torch.float64)
    temperature = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.5])
    tokens, logprobs = sample(logits, u, temperature, torch.zeros(5, dtype=torch.long), torch.ones(5))
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
    assert torch.allclose(logprobs[greedy], torch.log_softmax(logits, -1).gather(1, tokens[:, None])[greedy, 0])


def test_a_rows_token_depends_only_on_its_logits_seed_sample_and_position():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    keys = torch.tensor([seed_key(s) for s in (1, 1, 2, 3, 3, 3)])
    index, position = torch.tensor([0, 1, 0, 0, 1, 2]), torch.tensor([4, 4, 0, 9, 9, 9])
    params = lambda rows: (torch.ones(rows), torch.tensor([0, 5, 0, 0, 0, 10])[:rows], torch.full((rows,), 0.9))
    together, _ = sample(logits, uniforms(keys, index, position), *params(6), torch.arange(6))
    for order in (torch.arange(6).flip(0), torch.tensor([3, 0, 5, 1, 4, 2])):
        t, k, p = (x[order] for x in params(6))
        shuffled, _ = sample(logits[order], uniforms(keys[order], index[order], position[order]), t, k, p,
                             torch.arange(6))
        assert torch.equal(shuffled, together[order])
    one, _ = sample(logits[3:4], uniforms(keys[3:4], index[3:4], position[3:4]), *(x[3:4] for x in params(6)),
                    torch.arange(1))
    assert one.item() == together[3].item()
    # A different position, sample index or seed gives another draw.
    draws = {uniforms(keys[3:4], index[3:4], position[3:4] + d).item() for d in range(3)}
    assert len(draws) == 3
