"""Kimi Delta Attention hybrids: Kimi Linear (three KDA layers per MLA softmax layer), and Ling 2.5's
`bailing_hybrid`, whose linear layer in transformers 5.24 is the same gated delta rule.

KDA is Gated DeltaNet with a per-channel decay: S [rows, heads, d_k, d_v] with diag(α_t) in place of
GDN's scalar, plus the short-convolution state [rows, 3·heads·d, 4]; both go through the generic
linear-attention cache calls. The MLA softmax layers cache keys and values of different head sizes,
which a KV slot stores as they come.
"""
from rollout.families import Family

FAMILY = Family(
    "kda", ("kimi_linear", "bailing_hybrid"),
    state="delta-rule matrix [heads, d_k, d_v] (per-channel decay) + conv(4) over q, k, v",
    state_modules=("KimiLinearDeltaAttention", "BailingHybridDeltaAttention"),
    moe_blocks=("KimiLinearMoE", "BailingHybridMoE"))
