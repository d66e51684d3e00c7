"""The models: M1's lightning-attention MoE layout on transformers' MiniMaxForCausalLM, and tiny presets
of the other supported families (rollout.families), built offline.

Also owns what both generation and training need: the engine's cache for a model (from its family's
adapter; rollout.states), the decode attention kernel, and the fp32 LM head (M1 §3.2).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, MiniMaxConfig, MiniMaxForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rollout.config import m1_layer_types, preset_config
from rollout.families import family_of
from rollout.kernels import use_delta_rule_kernels
from rollout.states import StateCache


def build_hybrid(preset: str, vocab_size: int, **overrides) -> MiniMaxForCausalLM:
    """A randomly initialized MiniMaxForCausalLM in M1's 7:1 layout.

    `layer_types` sets the layout; transformers silently ignores the older `attn_type_list`.
    """
    kwargs = {**preset_config(preset), **overrides}
    if "model_type" in kwargs:
        raise ValueError(f"preset {preset!r} is a {kwargs['model_type']} model, not MiniMax; build it with build_model")
    kwargs.setdefault("layer_types", m1_layer_types(kwargs["num_hidden_layers"]))
    # `eager` experts: the default grouped_mm backend gave NaN grads when an expert got no tokens (docs/notes.md#model).
    config = MiniMaxConfig(vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)
    config._experts_implementation = "eager"
    return _random_pad_row(MiniMaxForCausalLM(config))


def build_model(preset: str, vocab_size: int, **overrides):
    """A randomly initialized causal LM of `preset` (rollout.config.PRESETS), built offline.

    A preset without `model_type` is MiniMax's layout (`build_hybrid`); one with a `model_type` is built
    from that family's own config class and causal-LM class (AutoConfig / AutoModelForCausalLM). Raises
    ValueError naming the valid presets for an unknown one, or the supported model types for a type
    the engine has no adapter for. Gated DeltaNet and KDA layers run fla's kernels on CUDA where fla is
    installed, transformers' torch path elsewhere (rollout.kernels.use_delta_rule_kernels).
    """
    kwargs = {**preset_config(preset), **overrides}
    model_type = kwargs.pop("model_type", "minimax")
    if model_type == "minimax":
        return build_hybrid(preset, vocab_size, **overrides)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, tie_word_embeddings=False, **kwargs)
    family_of(config)
    config._experts_implementation = "eager"
    model = _random_pad_row(AutoModelForCausalLM.from_config(config))
    use_delta_rule_kernels(model)
    return model


def _random_pad_row(model):
    """The pad row starts at zero; a sampled pad token then makes an all-zero row in layer 0's linear
    attention, whose backward gave inf/NaN gradients (measured on MiniMax). A random row avoids it."""
    config = model.config
    if config.pad_token_id is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    return model


def new_cache(model) -> StateCache:
    """An empty engine cache for `model`, from its family's adapter (rollout.families).

    Raises ValueError naming the model type and the supported ones when no adapter covers it, or naming
    the layer when a layer's kind cannot be batched (sliding-window attention, for example).
    """
    return family_of(model.config).new_cache(model)


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
    return out.view(b, heads, 1, value.shape[-1]).transpose(1, 2), None  # MLA: value heads differ from query heads


AttentionInterface.register("decode", _decode_attention)
AttentionMaskInterface.register("decode", sdpa_mask)


def use_decode_attention(model) -> None:
    """Switch a model's softmax layers to `_decode_attention`, and the modules its family replaces for decoding
    to their decode forwards (rollout.families); for generation-only replicas."""
    model.set_attn_implementation("decode")
    family_of(model.config).use_decode_forwards(model)


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
    """An HF causal-LM directory of a supported family (rollout.families), in `dtype` on `device`, with eager
    experts like `build_model`'s (training needs them; the engine switches its replica to grouped GEMMs) and,
    like it, fla's kernels for Gated DeltaNet and KDA on CUDA only.

    Raises ValueError naming the model type or the layer kind, and what is supported, from config.json
    alone, before any weights load (`family_of`).
    """
    family_of(AutoConfig.from_pretrained(str(path)))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    model.config._experts_implementation = "eager"
    use_delta_rule_kernels(model)
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


# ChatML, for a fresh character tokenizer asked to speak chat (model.chat_template): its turn markers
# are single special tokens, and it only appends, as multi-turn episodes need (cispo.multiturn). The
# Hermes tool-call tags are single tokens too, as in Qwen's tokenizer: a call costs its JSON only.
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def starting_model(cfg) -> tuple:
    """(model, tokenizer) a recipe's `model` section asks for: an HF directory, or a fresh preset
    with the offline character tokenizer (with ChatML's markers and template when `cfg.chat_template`),
    seeded by `cfg.seed`."""
    if cfg.path:
        if not Path(cfg.path).is_dir():
            raise FileNotFoundError(f"model.path {cfg.path} is not a directory")
        return load_model(cfg.path), load_tokenizer(cfg.path)
    tok = build_char_tokenizer(cfg.alphabet)
    if cfg.chat_template:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<tool_call>",
                                                                 "</tool_call>"]})
        tok.chat_template = CHATML
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.preset, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
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
