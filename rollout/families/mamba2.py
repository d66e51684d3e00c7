"""Mamba2 hybrids: Nemotron-H, whose layer pattern mixes Mamba2 mixers, softmax attention, MLP and MoE
layers (the last two hold no state and get empty slots).

A Mamba2 mixer keeps its SSM state [rows, heads, head_dim, state_size] and the last 4 inputs of its
causal convolution over x, B, C [rows, inner + 2·groups·state_size, 4], both through the generic
linear-attention cache calls.
"""
from rollout.families import Family

FAMILY = Family("mamba2", ("nemotron_h",), state="SSM state [heads, head_dim, d_state] + conv(4) over x, B, C",
                state_modules=("NemotronHMamba2Mixer",), moe_blocks=("NemotronHMoE",))
