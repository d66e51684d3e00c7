"""flash-linear-attention's Triton kernels (`pip install -e .[gpu]`) for the linear-state families.

Gated DeltaNet and KDA (`use_delta_rule_kernels`): transformers 5.24's own modeling code already calls
fla's ops when fla imports: its `torch_chunk_gated_delta_rule` (prefill) and
`torch_recurrent_gated_delta_rule` (decode) for Qwen3.5 / Qwen3-Next, and `chunk_kimi_delta_attention` /
`recurrent_kimi_delta_attention` for Kimi Linear and Ling 2.5, each bound at import to fla's
`chunk_gated_delta_rule`, `fused_recurrent_gated_delta_rule`, `chunk_kda` or `fused_recurrent_kda`, with
the torch reference kept as its `__wrapped__`. The binding ignores the device, so with fla installed a
CPU forward fails ("0 active drivers"). It passes the engine's recurrent state in (`initial_state`) and
takes the new one out (`output_final_state`), in fla's layout [rows, value heads, d_k, d_v], the torch
path's too; the conv state stays on transformers' torch path (or `causal-conv1d` where installed).
`use_delta_rule_kernels` picks per layer and per call which of the two runs.

MiniMax's lightning attention (`use_fla_lightning`) is simple gated linear attention with a constant
per-head decay: with S_t = exp(-λ_h) S_{t-1} + k_tᵀ v_t and o_t = q_t S_t (no 1/√d scale), it is fla's
`simple_gla` with g_gamma = -λ_h. λ_h is the module's own `get_slope_rate()` (M1's per-layer slopes) in fp32,
so the kernels reproduce transformers' MiniMaxLightningAttention exactly up to rounding. fla's
`chunk_lightning_attn` wrappers are not used: they derive their decay as
-(8/H)(1 - layer/L)·h, which is not the slope MiniMax checkpoints were trained with.

Prefill (several tokens) runs the chunked kernel, decode (one token) the fused recurrent one; the
linear state [rows, heads, d, d] stays in the engine's cache, in fp32. The torch path remains the
CPU path and the reference (tests/rollout/test_kernels.py checks the recurrent kernel against it
on the CPU under TRITON_INTERPRET=1; benchmarks/gpu_check.py checks both kernels on CUDA).
"""
from __future__ import annotations

import importlib
import inspect
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


# transformers 5.24's names for the recurrences its GDN and KDA layers call, and which phase each runs.
DELTA_RULE_OPS = {"torch_chunk_gated_delta_rule": "prefill", "torch_recurrent_gated_delta_rule": "decode",
                  "chunk_kimi_delta_attention": "prefill", "recurrent_kimi_delta_attention": "decode"}


def use_delta_rule_kernels(model, fla: str = "cuda") -> int:
    """Choose fla's kernels or transformers' torch reference for every Gated DeltaNet / KDA layer of `model`;
    returns how many layers (0 when fla does not import: the torch reference is then all there is).

    `fla`: "cuda" runs fla's kernels on CUDA tensors and the torch reference on any other (what `build_model`
    and `load_model` bind); "none" the torch reference everywhere (the parity reference on CUDA); "all"
    fla's kernels everywhere (a CPU then needs TRITON_INTERPRET=1); "decode" fla's recurrent kernel
    everywhere and the torch reference for prefill (Triton's interpreter runs fla's recurrent kernels but
    not its chunked ones, tests/rollout/test_kernels.py). Raises ValueError naming the valid choices.
    """
    choices = ("cuda", "none", "all", "decode")
    if fla not in choices:
        raise ValueError(f"fla kernels {fla!r}: expected one of {', '.join(choices)}")
    try:
        for name in ("fla.ops.gated_delta_rule", "fla.ops.kda"):  # `import fla...` would rebind the argument
            importlib.import_module(name)
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        # The forward under upstream's decorators, which matter to neither engine nor trainer: a keyword
        # renamed in 5.40 (`cache_params`; both pass `cache`) and accelerate's offload hooks (no offload here).
        forward = inspect.unwrap(type(module).forward)
        names = [name for name in DELTA_RULE_OPS if name in forward.__code__.co_names]
        if not names:
            continue
        ops = {name: _delta_rule_op(forward.__globals__[name], fla, DELTA_RULE_OPS[name]) for name in names}
        # The same code reading these names from its own globals: per layer, nothing upstream is changed.
        rebound = types.FunctionType(forward.__code__, {**forward.__globals__, **ops}, forward.__name__,
                                     forward.__defaults__, forward.__closure__)
        rebound.__kwdefaults__ = forward.__kwdefaults__
        module.forward = types.MethodType(rebound, module)
        count += 1
    return count


def _delta_rule_op(dispatched, fla: str, phase: str):
    """`dispatched` (transformers' binding: fla's op) or its torch reference, per `fla` and the op's phase."""
    reference = dispatched.__wrapped__
    if fla == "cuda":
        return lambda query, *args, **kwargs: (dispatched if query.is_cuda else reference)(query, *args, **kwargs)
    return dispatched if fla == "all" or (fla == "decode" and phase == "decode") else reference
