"""Dense softmax-attention models: every layer is a growing KV slot, no recurrent state."""
from rollout.families import Family

FAMILY = Family("dense", ("llama", "qwen2", "qwen3", "mistral"), state="none (softmax KV only)")
