"""Device-side token sampling with a counter-based random stream per row.

A row's uniform draw at response position t is Philox-4x32-10 (Salmon, Moraes, Dror and Shaw,
"Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011; the generator behind cuRAND and torch's CUDA
RNG) keyed by the request seed and counting (t, sample index). So a row's tokens depend only on
(request seed, sample index, position) and its logits: never on its neighbours, the batch size or
when it was admitted. Everything is vectorized over rows in int64 torch ops, one kernel sequence for
the whole batch per step, and gives the same bits on every device: 32x32-bit products are split
into 16-bit halves so that no int64 operation overflows.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Philox-4x32 round multipliers and Weyl key increments (Salmon et al. 2011, table 2).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for a < 2^32 (int64 tensor) and a 32-bit constant b."""
    low_part, high_part = a * (b & 0xFFFF), a * (b >> 16)  # each < 2^48
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _MASK32
    hi = (high_part + (low_part >> 16)) >> 16
    return hi, lo


def philox4x32(counter: torch.Tensor, key: torch.Tensor, rounds: int = 10) -> torch.Tensor:
    """Philox-4x32-`rounds`: counter [..., 4] and key [..., 2] of 32-bit words in int64 -> [..., 4] words."""
    c0, c1, c2, c3 = counter.unbind(-1)
    k0, k1 = key.unbind(-1)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack([c0, c1, c2, c3], -1)


def seed_key(seed: int) -> tuple[int, int]:
    """A request seed (any Python int) as Philox's two 32-bit key words."""
    return seed & _MASK32, (seed >> 32) & _MASK32


def uniforms(keys: torch.Tensor, sample_index: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per row: keys [rows, 2] (`seed_key`), sample_index and position [rows] int64.

    fp64, so the 32 random bits survive; (word + 0.5) / 2^32 never returns 0 or 1.
    """
    counter = torch.stack([position, sample_index, torch.zeros_like(position), torch.zeros_like(position)], -1)
    return (philox4x32(counter & _MASK32, keys)[:, 0].double() + 0.5) / 2.0**32


def sample(logits: torch.Tensor, u: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, filtered: torch.Tensor | None = None):
    """One token per row by inverting its CDF at `u`; returns (tokens, logprob of token), fp32 logprobs.

    logits [rows, vocab] fp32; u [rows] from `uniforms`; temperature [rows] (0 is greedy), top_k
    [rows] int (0 disables), top_p [rows]. `filtered` lists the rows with top-k or top-p: only they
    pay for the sort (a third of a decode step at a 4k vocabulary), and the caller knows them on the
    host, so none of this synchronizes. Logprobs are of the full tempered distribution, which is what
    the trainer recomputes; greedy rows report the untempered policy's.
    """
    vocab = logits.shape[1]
    greedy = temperature == 0
    logprobs = torch.log_softmax(logits / torch.where(greedy, 1.0, temperature).unsqueeze(1), -1)
    probs = logprobs.exp()
    order = None
    if filtered is not None and len(filtered):
        order = torch.arange(vocab, device=logits.device).expand_as(logits).clone()
        probs[filtered], order[filtered] = _top_k_top_p(probs[filtered], top_k[filtered], top_p[filtered])
    cdf = probs.cumsum(-1)
    picked = torch.searchsorted(cdf, (u.unsqueeze(1) * cdf[:, -1:].double()).float()).clamp(max=vocab - 1)
    if order is not None:
        picked = order.gather(1, picked)
    tokens = torch.where(greedy, logits.argmax(-1), picked.squeeze(1))
    return tokens, logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """Sorted probabilities with those outside top-k, then top-p (of the top-k renormalized), zeroed."""
    vocab = probs.shape[1]
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(vocab, device=probs.device)
    sorted_probs = sorted_probs * (rank < torch.where(top_k > 0, top_k, vocab).unsqueeze(1))
    before = sorted_probs.cumsum(-1) - sorted_probs
    return sorted_probs * (before < top_p.unsqueeze(1) * sorted_probs.sum(-1, keepdim=True)), order
