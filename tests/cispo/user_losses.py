"""A loss as a user writes one in their own module and names in a recipe (`algorithm.name:
user_losses:reinforce`): one function with the loss signature (cispo.loss), nothing registered."""
import os
import sys


def reinforce(logprobs, old_logprobs, advantages, mask, *, group_index, cfg):
    """REINFORCE with the group baseline: ℓ_t = −A_i · log π_θ(o_t), no ratio and no clip.

    Its figures report where it ran: `loss_rank`, the trainer rank (its mean over two ranks' tokens lies
    strictly between 0 and 1 only if both ranks ran it), and `sandbox_imported`, whether that rank's
    process has imported the code sandbox (a trainer rank has no reason to).
    """
    per_token = -advantages.unsqueeze(1) * logprobs
    rank = float(os.environ["RANK"])
    sandbox = float("rewards.sandbox" in sys.modules)
    return per_token, {"loss_rank": logprobs.detach() * 0 + rank, "sandbox_imported": logprobs.detach() * 0 + sandbox}
