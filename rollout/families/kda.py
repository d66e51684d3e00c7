"""Kimi Delta Attention hybrids: Kimi Linear (three KDA layers per MLA softmax layer), and Ling 2.5's
`bailing_hybrid`, whose linear layer in transformers 5.24 is the same gated delta rule.

KDA is Gated DeltaNet with a per-channel decay: S [rows, heads, d_k, d_v] with diag(α_t) in place of
GDN's scalar, plus the short-convolution state [rows, 3·heads·d, 4]; both go through the generic
linear-attention cache calls. Kimi Linear's MLA softmax layers cache the compressed latent
[rows, 1, T, kv_lora_rank] and the shared rope key [rows, 1, T, rope]; a KV slot stores them as they come.
"""
from __future__ import annotations

import torch

from rollout.families import Family


def mla_decode_forward(self, hidden_states: torch.Tensor, attention_mask, cache=None, **kwargs):
    """`KimiLinearAttention.forward` for one new token per row, with the up-projection absorbed.

    transformers' forward re-expands every cached latent through `kv_b_proj` at each step, so a step
    costs T·kv_lora_rank·heads·(d_nope + d_v) multiply-adds and grows with context T far faster than
    reading the cache. DeepSeek-V2 (§2.1.2) absorbs W_UK into the query and W_UV into the output:
    scores = (q_nope W_UK)·c + q_rope·k_rope and out = (p·c) W_UVᵀ, so a step reads the latent cache once.
    The same sums in another order: equal to the expanded form up to fp32 rounding. Prefill (several
    tokens) runs the module's own forward.
    """
    if hidden_states.shape[1] != 1 or cache is None:
        return type(self).forward(self, hidden_states, attention_mask, cache=cache, **kwargs)
    b = hidden_states.shape[0]
    q = self.q_proj(hidden_states) if self.q_lora_rank is None else \
        self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
    q_nope, q_rope = q.view(b, -1, 1, self.qk_head_dim).split([self.qk_nope_head_dim, self.qk_rope_head_dim], -1)
    latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
    latent, k_rope = cache.update(self.kv_a_layernorm(latent).view(b, 1, 1, -1), k_rope.view(b, 1, 1, -1),
                                  self.layer_idx)  # [b, 1, T, r], [b, 1, T, rope]
    w = self.kv_b_proj.weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
    w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], 1)  # [heads, d_nope, r], [heads, d_v, r]
    # Heads as the rows of one matmul against the single latent "head": no per-head copy of the cache.
    q_latent, q_rope = (q_nope @ w_uk).view(b, 1, -1, self.kv_lora_rank), q_rope.reshape(b, 1, -1, q_rope.shape[-1])
    scores = (q_latent @ latent.transpose(-1, -2) + q_rope @ k_rope.transpose(-1, -2)) * self.scaling  # [b, 1, heads, T]
    if attention_mask is not None:  # bool [b, 1, 1, T] from `sdpa_mask`
        scores = scores.masked_fill(~attention_mask.view(b, 1, 1, -1), float("-inf"))
    out = (torch.softmax(scores, -1) @ latent).view(b, -1, 1, self.kv_lora_rank) @ w_uv.transpose(-1, -2)
    return self.o_proj(out.reshape(b, 1, -1)), None  # out [b, heads, 1, d_v]


FAMILY = Family(
    "kda", ("kimi_linear", "bailing_hybrid"),
    state="delta-rule matrix [heads, d_k, d_v] (per-channel decay) + conv(4) over q, k, v",
    state_modules=("KimiLinearDeltaAttention", "BailingHybridDeltaAttention"),
    moe_blocks=("KimiLinearMoE", "BailingHybridMoE"),
    decode_forwards={"KimiLinearAttention": mla_decode_forward})
