"""The hybrid model: M1's lightning-attention MoE layout on transformers' MiniMaxForCausalLM.

Also owns the two model fixes both generation and training need: a cache that reports the true
sequence length when layer 0 is linear (docs/notes.md#model), and the fp32 LM head (M1 §3.2).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (AttentionInterface, AutoModelForCausalLM, MiniMaxConfig, MiniMaxForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from rollout.config import m1_layer_types, preset_config


def build_hybrid(preset: str, vocab_size: int, **overrides) -> MiniMaxForCausalLM:
    """A randomly initialized MiniMaxForCausalLM in M1's 7:1 layout.

    `layer_types` sets the layout; transformers silently ignores the older `attn_type_list`.
    """
    kwargs = {**preset_config(preset), **overrides}
    kwargs.setdefault("layer_types", m1_layer_types(kwargs["num_hidden_layers"]))
    # `eager` experts: the default grouped_mm backend gave NaN grads when an expert got no tokens (docs/notes.md#model).
    config = MiniMaxConfig(vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)
    config._experts_implementation = "eager"
    model = MiniMaxForCausalLM(config)
    if config.pad_token_id is not None:
        # The pad row starts at zero; a sampled pad token then makes an all-zero row in layer 0's
        # lightning attention, whose backward gave inf/NaN gradients (measured). A random row avoids it.
        with torch.no_grad():
            model.model.embed_tokens.weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    return model


class GrowingLayer(DynamicLayer):
    """A softmax layer's KV that writes into spare capacity instead of concatenating.

    Upstream `DynamicLayer.update` concatenates, copying the whole KV for every decoded token, so a
    softmax layer's per-token cost grows with context; here a copy happens once per 25% of growth.
    `keys`/`values` stay views of the stores, so upstream code reading them is unchanged.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.set(key_states[..., :0, :], value_states[..., :0, :])
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.key_store.shape[-2]:
            self.set(self.keys, self.values, room=key_states.shape[-2])
        self.key_store[..., start:end, :] = key_states
        self.value_store[..., start:end, :] = value_states
        self.keys, self.values = self.key_store[..., :end, :], self.value_store[..., :end, :]
        return self.keys, self.values

    def set(self, keys: torch.Tensor, values: torch.Tensor, room: int = 0) -> None:
        """Replace the contents with `keys`/`values` [B, heads, T, d], keeping spare capacity after them."""
        length = keys.shape[-2]
        capacity = length + room + max(length // 4, 256)
        self.key_store = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        self.value_store = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        self.key_store[..., :length, :] = keys
        self.value_store[..., :length, :] = values
        self.keys, self.values = self.key_store[..., :length, :], self.value_store[..., :length, :]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.set(self.keys[indices], self.values[indices])


class HybridCache(MiniMaxCache):
    """The engine's cache for any supported model: MiniMax's hybrid layout, or dense softmax layers.

    It measures length on the first softmax layer: upstream MiniMaxCache reads layer 0, which is a
    linear layer in M1's layout and never stores keys, so it reports 0 and breaks padded cached
    decoding and chunked prefill (docs/notes.md#model). Being a MiniMaxCache (a DynamicCache) it is accepted by
    MiniMax models and by dense ones (Llama, Qwen2), which then simply have no linear states.
    Rows are sequences: `select` drops finished ones, `extend` appends newly prefilled ones. Linear
    layers hold one [heads, d, d] state per row; softmax layers hold left-padded KV of one length.
    """

    def __init__(self, layer_types: list[str]):
        super().__init__()
        self.layer_class_to_replicate = GrowingLayer
        self.length_layer = layer_types.index("full_attention") if "full_attention" in layer_types else 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx or self.length_layer)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return super().get_mask_sizes(query_length, layer_idx or self.length_layer)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select(indices)

    def select(self, rows: torch.Tensor, drop_left: int = 0) -> None:
        """Keep batch `rows` and drop the first `drop_left` positions (padding that every kept row has)."""
        # Upstream indexes `linear_cache` for every layer and fails when the last layer is softmax.
        self.linear_cache = [s[rows] if isinstance(s, torch.Tensor) else s for s in self.linear_cache]
        for layer in self.layers:
            if layer.is_initialized:
                layer.set(layer.keys[rows, :, drop_left:], layer.values[rows, :, drop_left:])

    def extend(self, other: "HybridCache") -> tuple[int, int]:
        """Append `other`'s rows after ours. The shorter side's KV is left-padded so that both end at
        the same position; returns the padding added to (ours, theirs), for the attention masks."""
        length = max(self.get_seq_length(), other.get_seq_length())
        pads = length - self.get_seq_length(), length - other.get_seq_length()
        self.linear_cache = [torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
                             for a, b in zip(self.linear_cache, other.linear_cache)]
        for mine, theirs in zip(self.layers, other.layers):
            if mine.is_initialized:
                mine.set(*(torch.cat([F.pad(a, (0, 0, pads[0], 0)), F.pad(b, (0, 0, pads[1], 0))])
                           for a, b in ((mine.keys, theirs.keys), (mine.values, theirs.values))))
        return pads


ENGINE_LAYER_TYPES = ("full_attention", "linear_attention")


def layer_types(config) -> list[str]:
    """Each layer's attention kind; dense configs without `layer_types` are all full attention.

    Raises ValueError for kinds the engine's cache cannot batch (sliding-window or SSM layers).
    """
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    for i, kind in enumerate(types):
        if kind not in ENGINE_LAYER_TYPES:
            raise ValueError(f"{config.model_type} layer {i} is {kind!r}; the rollout engine runs "
                             f"{' and '.join(ENGINE_LAYER_TYPES)} layers only")
    return types


def new_cache(model) -> HybridCache:
    return HybridCache(layer_types(model.config))


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Softmax attention for one new token per row, reading each KV head once.

    A decode step is bound by reading the KV. transformers' SDPA path copies every KV head out to
    each query head it serves when a padding mask is present (grouped-query attention), and CPU
    SDPA is slower than two matmuls for a single query (measured 4.4 vs 3.0 ms at 32k). Prefill
    (several tokens) goes to SDPA unchanged.
    """
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    b, heads, _, d = query.shape
    grouped = query.view(b, key.shape[1], heads // key.shape[1], d)  # query heads grouped by their KV head
    scores = (grouped @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:  # bool [b, 1, 1, kv_length] from `sdpa_mask`
        scores = scores.masked_fill(~attention_mask.view(b, 1, 1, -1), float("-inf"))
    out = torch.softmax(scores, -1) @ value
    return out.view(b, heads, 1, d).transpose(1, 2), None


AttentionInterface.register("decode", _decode_attention)
AttentionMaskInterface.register("decode", sdpa_mask)


def use_decode_attention(model) -> None:
    """Switch a model's softmax layers to `_decode_attention`; for generation-only replicas."""
    model.set_attn_implementation("decode")


def fp32_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head in fp32: M1 found bf16 heads decorrelate training and inference probabilities."""
    return hidden.float() @ model.lm_head.weight.float().t()


def head_logits(model, hidden: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits [rows, vocab] as fp32 from the LM head computed in `dtype` (hidden [rows, H]).

    fp32 is `fp32_logits`, what rollout and training use. bf16 is the head M1 had before its fix
    (§3.2): operands and output rounded to bf16; only experiments/fp32_head.py asks for it.
    """
    if dtype == torch.float32:
        return fp32_logits(model, hidden)
    return (hidden.to(dtype) @ model.lm_head.weight.to(dtype).t()).float()


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Any HF causal-LM directory, in `dtype` on `device`; MiniMax models get eager experts like
    `build_hybrid` ones."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    if model.config.model_type == "minimax":
        model.config._experts_implementation = "eager"
    return model


# ---------------------------------------------------------------- offline character tokenizer

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """A character-level HF tokenizer built offline (no hub): one id per character, and BOS in front of
    every encoded text, so a user of a saved model who calls `tok(prompt)` gets what training used."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    chars = sorted(set(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", padding_side="left")


def starting_model(cfg) -> tuple:
    """(model, tokenizer) a recipe's `model` section asks for: an HF directory, or a fresh preset
    with the offline character tokenizer, seeded by `cfg.seed`."""
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"model.path {cfg.path} is not a directory")
        return load_model(cfg.path), load_tokenizer(cfg.path)
    tok = build_char_tokenizer(cfg.alphabet)
    torch.manual_seed(cfg.seed)
    model = build_hybrid(cfg.preset, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **cfg.overrides)
    return model, tok


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


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log π(target) and entropy from `hidden @ weightᵀ / temperature` in fp32, one token chunk at a time.

    Only [chunk, vocab] logits ever exist: forward keeps per-token log-sum-exp and entropy, backward
    recomputes each chunk's logits and writes the analytic gradient over them in place, which is
    cheaper than autograd's chain of [tokens, vocab] temporaries (and exact, not approximate).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int):
        w = weight.float()
        logp, entropy, lse = (hidden.new_empty(targets.shape, dtype=torch.float32) for _ in range(3))
        for i in range(0, hidden.shape[0], chunk):
            s = slice(i, i + chunk)
            z = (hidden[s].float() @ w.t()).div_(temperature)
            target_logit = z.gather(1, targets[s, None]).squeeze(1)
            # A stable log-sum-exp done in place (torch.logsumexp would allocate a second [chunk, vocab]).
            top = z.amax(-1, keepdim=True)
            p = z.sub_(top).exp_()
            total = p.sum(-1, keepdim=True)
            lse[s] = (top + total.log()).squeeze(1)
            logp[s] = target_logit - lse[s]
            entropy[s] = -p.div_(total).xlogy_(p).sum(-1)  # −Σ p log p
            del z, p  # free this chunk's logits before the next chunk's matmul allocates its own
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        if g_logp is None and g_entropy is None:
            return None, None, None, None, None
        w, t = weight.float(), ctx.temperature
        # d log p_y / dz = onehot_y − p;  dH/dz = −p (log p + H);  both divided by T for the raw logits.
        g = (g_logp if g_logp is not None else torch.zeros_like(lse)) / t
        g_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        g_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            s = slice(i, i + ctx.chunk)
            h = hidden[s].float()
            z = (h @ w.t()).div_(t).sub_(lse[s, None])  # log p, recomputed
            if g_entropy is None:
                grad = z.exp_().mul_(-g[s, None])
            else:
                p = torch.exp(z)
                grad = z.add_(entropy[s, None]).mul_(g_entropy[s, None] / t).add_(g[s, None]).mul_(p).neg_()
                del p
            grad.scatter_add_(1, targets[s, None], g[s, None])
            if g_hidden is not None:
                g_hidden[s] = grad @ w
            if g_weight is not None:
                g_weight.addmm_(grad.t(), h)
            del z, grad
        return g_hidden, None if g_weight is None else g_weight.to(weight.dtype), None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0, chunk_tokens: int = 1024):
    """Per-token log π(target) and entropy from the fp32 head, chunked over tokens.

    Extra peak memory is O(chunk_tokens × vocab) rather than O(tokens × vocab) — at M1's vocabulary
    an 80k-token response would need tens of GB of logits — and the gradient is the exact one.
    `hidden` is [..., H], `weight` the [vocab, H] LM head and `targets` [...]; both outputs are fp32,
    shaped like `targets`.
    """
    flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    logp, entropy = _ChunkedHeadLogprobs.apply(flat_h, weight, flat_t, float(temperature), chunk_tokens)
    return logp.view_as(targets), entropy.view_as(targets)
