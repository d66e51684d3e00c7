"""Softmax-attention models, dense or MoE FFN: every layer is a growing KV slot, no recurrent state."""
from rollout.families import Family

FAMILY = Family("dense", ("llama", "qwen2", "qwen3", "mistral", "qwen3_moe"), state="none (softmax KV only)",
                moe_blocks=("Qwen3MoeSparseMoeBlock",))
