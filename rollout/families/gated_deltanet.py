"""Gated DeltaNet hybrids: Qwen3.5 (dense and MoE) and Qwen3-Next, three GDN layers per softmax layer.

A GDN layer keeps S [rows, value heads, d_k, d_v] (delta rule with a scalar decay per head,
S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ) and the last 4 inputs of its causal
convolution over q, k, v [rows, 2·key_dim + value_dim, 4]. transformers reads and writes both through
the generic linear-attention cache calls, so the slots need no mapping here.
"""
from rollout.families import Family

FAMILY = Family(
    "gated_deltanet", ("qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next"),
    state="delta-rule matrix [heads, d_k, d_v] + conv(4) over q, k, v",
    state_modules=("Qwen3_5GatedDeltaNet", "Qwen3_5MoeGatedDeltaNet", "Qwen3NextGatedDeltaNet"),
    moe_blocks=("Qwen3_5MoeSparseMoeBlock", "Qwen3NextSparseMoeBlock"))
