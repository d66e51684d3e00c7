"""The hybrid model: M1's lightning-attention MoE layout on transformers' MiniMaxForCausalLM.

Also owns the two model fixes both generation and training need: a cache that reports the true
sequence length when layer 0 is linear (DESIGN §5), and the fp32 LM head (M1 §3.2).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MiniMaxConfig, MiniMaxForCausalLM, PreTrainedTokenizerFast
from transformers.models.minimax.modeling_minimax import MiniMaxCache

# Every preset follows M1: seven lightning-attention layers, then one softmax layer, repeated.
PRESETS: dict[str, dict] = {
    # 3.8M parameters: the CPU calibration model of DESIGN §9.
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=4, num_local_experts=4, num_experts_per_tok=2, block_size=64),
    "small": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, num_local_experts=4, num_experts_per_tok=2, block_size=128),
    # MiniMax-M1's published shape (456B total, 45.9B active); for planning, not for this machine.
    "m1": dict(hidden_size=6144, intermediate_size=9216, num_hidden_layers=80, num_attention_heads=64,
               num_key_value_heads=8, head_dim=128, num_local_experts=32, num_experts_per_tok=2,
               block_size=256, max_position_embeddings=10_240_000),
}


def m1_layer_types(num_layers: int, linear_per_full: int = 7) -> list[str]:
    """Seven linear layers then one full-attention layer, repeated (layer 0 is linear)."""
    period = linear_per_full + 1
    return ["full_attention" if (i + 1) % period == 0 else "linear_attention" for i in range(num_layers)]


def build_hybrid(preset: str, vocab_size: int, **overrides) -> MiniMaxForCausalLM:
    """A randomly initialized MiniMaxForCausalLM in M1's 7:1 layout.

    `layer_types` sets the layout; transformers silently ignores the older `attn_type_list`.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    kwargs = {**PRESETS[preset], **overrides}
    kwargs.setdefault("layer_types", m1_layer_types(kwargs["num_hidden_layers"]))
    # `eager` experts: the default grouped_mm backend gave NaN grads when an expert got no tokens (DESIGN §9).
    config = MiniMaxConfig(vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)
    config._experts_implementation = "eager"
    return MiniMaxForCausalLM(config)


class HybridCache(MiniMaxCache):
    """MiniMaxCache that measures length on the first softmax layer.

    Upstream reads layer 0, which is a linear layer in M1's layout and never stores keys, so it
    reports 0 and breaks padded cached decoding and chunked prefill (DESIGN §5).
    """

    def __init__(self, layer_types: list[str]):
        super().__init__()
        self.length_layer = layer_types.index("full_attention") if "full_attention" in layer_types else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx or self.length_layer)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, layer_idx or self.length_layer)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        # Upstream indexes `linear_cache` for every layer and fails when the last layer is softmax.
        self.linear_cache = [s[indices] if isinstance(s, torch.Tensor) else s for s in self.linear_cache]
        for layer in self.layers:
            if layer.is_initialized:
                layer.batch_select_indices(indices)


def new_cache(model) -> HybridCache:
    return HybridCache(list(model.config.layer_types))


def fp32_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32: M1 found bf16 heads decorrelate training and inference probabilities."""
    return hidden.float() @ model.lm_head.weight.float().t()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """Any HF causal-LM directory; MiniMax models get eager experts like `build_hybrid` ones."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if model.config.model_type == "minimax":
        model.config._experts_implementation = "eager"
    return model


# ---------------------------------------------------------------- offline character tokenizer

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer built offline (no hub): one id per character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def save_model(model, tokenizer, path: str | Path) -> None:
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _chunk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float):
    logits = (hidden.float() @ weight.float().t()) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk_tokens: int = 4096):
    """Per-token log π(target) and entropy from the fp32 head, chunked over tokens.

    Each chunk is recomputed in backward (activation checkpointing), so the extra peak memory is
    O(chunk_tokens × vocab) rather than O(tokens × vocab); the gradient is the exact one.
    """
    from torch.utils.checkpoint import checkpoint

    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    parts = [checkpoint(_chunk_logprobs, flat_h[i:i + chunk_tokens], weight, flat_t[i:i + chunk_tokens],
                        temperature, use_reentrant=False)
             for i in range(0, flat_h.shape[0], chunk_tokens)]
    logp, entropy = (torch.cat(x).view_as(targets) for x in zip(*parts))
    return logp, entropy
