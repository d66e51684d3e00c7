"""MiniMax's lightning attention through flash-linear-attention's Triton kernels (`pip install -e .[gpu]`).

Lightning attention is simple gated linear attention with a constant per-head decay: with
S_t = exp(-λ_h) S_{t-1} + k_tᵀ v_t and o_t = q_t S_t (no 1/√d scale), it is fla's `simple_gla`
with g_gamma = -λ_h. λ_h is the module's own `get_slope_rate()` (M1's per-layer slopes) in fp32,
so the kernels reproduce transformers' MiniMaxLightningAttention exactly up to rounding. fla's
`chunk_lightning_attn` wrappers are not used: they derive their decay as
-(8/H)(1 - layer/L)·h, which is not the slope MiniMax checkpoints were trained with.

Prefill (several tokens) runs the chunked kernel, decode (one token) the fused recurrent one; the
linear state [rows, heads, d, d] stays in the engine's cache, in fp32. The torch path remains the
CPU path and the reference (tests/rollout/test_kernels.py checks the recurrent kernel against it
on the CPU under TRITON_INTERPRET=1; benchmarks/gpu_check.py checks both kernels on CUDA).
"""
from __future__ import annotations

import types

import torch


def use_fla_lightning(model) -> int:
    """Route every MiniMax lightning-attention layer of `model` through fla; returns how many.

    Raises ImportError (naming the extra to install) when flash-linear-attention is missing.
    """
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError as e:
        raise ImportError("lightning attention on GPU needs flash-linear-attention: pip install -e .[gpu]") from e
    layers = [m for m in model.modules() if type(m).__name__ == "MiniMaxLightningAttention"]
    for layer in layers:
        layer.fla_g_gamma = -layer.get_slope_rate(device=layer.qkv_proj.weight.device).float().view(-1)
        layer.forward = types.MethodType(_fla_forward, layer)
    return len(layers)


def _fla_forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                 **kwargs):
    """MiniMaxLightningAttention.forward with the recurrence in fla's kernels; same inputs and outputs."""
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    b, t, _ = hidden_states.shape
    qkv = self.act_fn(self.qkv_proj(hidden_states))
    if attention_mask is not None:  # 2D padding mask: padded tokens add nothing to the state
        qkv = qkv * attention_mask[:, :, None].to(qkv.dtype)
    q, k, v = qkv.view(b, t, self.num_attention_heads, 3 * self.head_dim).split(self.head_dim, dim=3)
    state = cache.get_linear_cache(self.layer_idx) if cache is not None else None
    state = state if isinstance(state, torch.Tensor) else None
    kernel = fused_recurrent_simple_gla if t == 1 else chunk_simple_gla
    out, state = kernel(q.contiguous(), k.contiguous(), v.contiguous(), g_gamma=self.fla_g_gamma, scale=1.0,
                        initial_state=state, output_final_state=cache is not None)
    out = self.norm(out.reshape(b, t, -1).to(hidden_states.dtype))
    out = self.out_proj(torch.sigmoid(self.output_gate(hidden_states)) * out)
    if cache is not None:
        cache.set_linear_cache(self.layer_idx, state)
    return out, state
