"""MoE routing replay (R3): the engine records which experts each token was routed to, and the trainer's
forward routes every token to those experts instead of its own router's top-k.

Why: bf16 rollout weights (or any numerics apart from the trainer's) flip near-tied top-k choices, and a
token routed to other experts gets a different log-probability, a mismatch that IS corrections can only
reweight or mask. Replaying the sampler's experts removes that part of KL(μ‖π) ("Stabilizing MoE RL by
aligning training and inference routers", R3; prime-rl measured 0.0015 -> 0.0002-0.0005 on Qwen3-30B-A3B;
ours in README, "The trainer", and experiments/routing_replay.py).
The gate weights still come from the trainer's router: its softmax probabilities at the replayed experts,
renormalized as the router renormalizes its own top-k (as verl's router replay does), so the router keeps
its gradient.

Routing is a tensor [tokens, MoE layers, k] of expert indices (int16 on the host); -1 marks a token whose
routing was not recorded, which the trainer routes itself. The routers covered return (logits, top-k
weights, top-k indices) from a softmax over the experts: MiniMax, Qwen3-MoE, Qwen3.5-MoE and Qwen3-Next.
"""
from __future__ import annotations

import torch

from rollout.config import ROUTING_REPLAY_TYPES
from rollout.families import family_of


def routers(model) -> list[torch.nn.Module]:
    """The router (`gate`) of each MoE block of `model`, in layer order.

    Raises ValueError naming the model type and the covered ones (rollout.config.ROUTING_REPLAY_TYPES) when
    the model is not one of them, or has no MoE layer."""
    kind = model.config.model_type
    if kind not in ROUTING_REPLAY_TYPES:
        raise ValueError(f"routing replay does not cover model type {kind!r}; it covers "
                         f"{', '.join(ROUTING_REPLAY_TYPES)}")
    moe_blocks = family_of(model.config).moe_blocks
    blocks = [m for m in model.modules() if type(m).__name__ in moe_blocks]
    if not blocks:
        raise ValueError(f"routing replay needs an MoE model; this {kind} model has no MoE layer")
    return [block.gate for block in blocks]


class RoutingRecorder:
    """Keeps the experts every router chose in the model's latest forward (hooks on each router)."""

    def __init__(self, model):
        self.last: list[torch.Tensor | None] = []
        for layer, router in enumerate(routers(model)):
            self.last.append(None)
            router.register_forward_hook(lambda module, args, out, layer=layer: self.last.__setitem__(layer, out[2]))

    def take(self) -> torch.Tensor:
        """The latest forward's routing [tokens (the forward's rows x positions, row-major), layers, k], int16,
        on the CPU (one host transfer)."""
        return torch.stack(self.last, 1).to(device="cpu", dtype=torch.int16)


class RoutingReplay:
    """Replays recorded routing in the trainer's forward. `set(routing)` before a forward, `set(None)` after
    its backward: activation checkpointing reruns the forward inside the backward, which must route alike."""

    def __init__(self, model):
        self.flat: torch.Tensor | None = None  # [rows x positions, layers, k] long
        for layer, router in enumerate(routers(model)):
            router.register_forward_hook(lambda module, args, out, layer=layer: self._replay(module, out, layer))

    def set(self, routing: torch.Tensor | None, width: int = 0) -> None:
        """Replay `routing` [B, positions, layers, k] (-1: the trainer's own choice) in forwards of [B, width]
        token rows; positions past the recorded ones (a row's last token, never fed at rollout) route freely."""
        if routing is None:
            self.flat = None
            return
        b, recorded, layers, k = routing.shape
        padded = torch.full((b, width, layers, k), -1, dtype=torch.long, device=routing.device)
        padded[:, :min(recorded, width)] = routing[:, :width]
        self.flat = padded.view(b * width, layers, k)

    def _replay(self, router, out, layer: int):
        if self.flat is None:
            return None
        logits, weights, own = out
        if logits.shape[0] != self.flat.shape[0]:
            raise ValueError(f"routing replay: the forward routes {logits.shape[0]} tokens but {self.flat.shape[0]} "
                             f"were set")
        chosen = self.flat[:, layer].to(own.device)
        chosen = torch.where(chosen >= 0, chosen, own)
        top = torch.softmax(logits.float(), -1).gather(-1, chosen)
        if getattr(router, "norm_topk_prob", True):  # MiniMax and Qwen3.5-MoE always renormalize; Qwen3-MoE if set
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(weights.dtype), chosen


def routing_rows(trajectories: list, width: int) -> torch.Tensor:
    """The trajectories' `routing` as one [rows, width, MoE layers, k] int16 tensor aligned with their
    right-padded [prompt + response] rows (position t: the t-th token fed), -1 where none was recorded."""
    shape = next((t.routing.shape[1:] for t in trajectories if t.routing is not None), (0, 0))
    out = torch.full((len(trajectories), width, *shape), -1, dtype=torch.int16)
    for i, t in enumerate(trajectories):
        if t.routing is not None:
            out[i, :len(t.routing)] = t.routing
    return out
