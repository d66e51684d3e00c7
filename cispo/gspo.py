"""GSPO, Group Sequence Policy Optimization (Zheng et al. 2025, arXiv 2507.18071): one importance
ratio per response instead of one per token. A loss in a file of its own: one registered function."""
from __future__ import annotations

from cispo.loss import LOSSES


@LOSSES.register("gspo", normalization="sequence", needs_eps_low=True)
def gspo_loss(logprobs, old_logprobs, advantages, mask, *, group_index, cfg):
    """GSPO's objective: the sequence ratio, the geometric mean of the response's token ratios,

        s_i = (π_θ(y_i|x) / π_old(y_i|x))^(1/|y_i|) = exp(1/|y_i| · Σ_t log r_t),
        J = E[ 1/G · Σ_i min(s_i · A_i, clip(s_i, 1 − ε_low, 1 + ε_high) · A_i) ],

    with A_i the response's group-relative advantage [B]. Response i's term −min(...) is put on each
    of its tokens; the 'sequence' normalization (each response's token mean, then the mean over
    responses) sums them back to −J. The gradient flows through s_i, so every token of a response gets
    the same weight s_i·A_i/|y_i|, and a clipped sequence gets none. The paper's ε are tiny
    (3e-4 and 4e-4): s_i is a mean over tokens, so it moves far less than a token's ratio.
    """
    mask = mask.to(logprobs.dtype)
    log_s = ((logprobs - old_logprobs) * mask).sum(1) / mask.sum(1).clamp(min=1)
    s = log_s.exp()
    clipped = s.clamp(min=1 - cfg.eps_low, max=1 + cfg.eps_high)
    term = (s * advantages).minimum(clipped * advantages)
    clip_fraction = (clipped != s).detach().to(logprobs.dtype)
    return -term.unsqueeze(1).expand_as(logprobs), {"clip_fraction": clip_fraction.unsqueeze(1).expand_as(logprobs)}
