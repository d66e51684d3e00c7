import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.minimax.modeling_minimax import MiniMaxCache

from rollout.model import build_hybrid, fp32_logits, load_model, load_tokenizer, new_cache, token_logprobs
from rollout.states import RecurrentSlot


def test_layout_is_seven_linear_then_one_full():
    model = build_hybrid("tiny", 32, num_hidden_layers=16)
    types = model.config.layer_types
    assert types[0] == "linear_attention"
    assert [i for i, t in enumerate(types) if t == "full_attention"] == [7, 15]
    kinds = [type(layer.self_attn).__name__ for layer in model.model.layers]
    assert kinds[7] == "MiniMaxAttention" and kinds[0] == "MiniMaxLightningAttention"


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="tiny"):
        build_hybrid("huge", 32)


def _padded_cached_decode(model, prompts, steps, cache):
    """transformers-style greedy decoding of a left-padded batch through a cache."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    out, logits = [], []
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for _ in range(steps):
            step_logits = res.logits[:, -1]
            nxt = step_logits.argmax(-1, keepdim=True)
            out.append(nxt)
            logits.append(step_logits)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            res = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
    return torch.cat(out, 1), torch.stack(logits, 1)


def test_cache_fix_left_padded_batch_matches_unpadded_singles():
    """Regression (docs/notes.md#model): with layer 0 linear, upstream MiniMaxCache reports length 0."""
    torch.manual_seed(0)
    model = build_hybrid("tiny", 32).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [7, 8], [9, 10, 11, 12]]
    singles = [_padded_cached_decode(model, [p], 12, new_cache(model)) for p in prompts]
    batched, batched_logits = _padded_cached_decode(model, prompts, 12, new_cache(model))
    for i, (tokens, logits) in enumerate(singles):
        assert torch.equal(batched[i], tokens[0])
        assert (batched_logits[i] - logits[0]).abs().max() < 1e-4
    # The same decode through the upstream cache goes wrong: the bug this fix exists for.
    _, upstream_logits = _padded_cached_decode(model, prompts, 12, MiniMaxCache())
    worst = max((upstream_logits[i] - singles[i][1][0]).abs().max() for i in range(len(prompts)))
    assert worst > 1e-2


def test_fp32_head_and_chunked_logprobs_match_naive():
    torch.manual_seed(0)
    model = build_hybrid("tiny", 32)
    ids = torch.randint(4, 32, (3, 20))
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    naive = torch.log_softmax(fp32_logits(model, hidden), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (g_naive,) = torch.autograd.grad(naive.sum(), model.lm_head.weight, retain_graph=True)
    chunked, entropy = token_logprobs(hidden, model.lm_head.weight, ids[:, 1:], chunk_tokens=7)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), model.lm_head.weight)
    assert chunked.dtype == torch.float32
    assert (chunked - naive).abs().max() < 1e-5
    assert (g_chunked - g_naive).abs().max() < 1e-5
    assert entropy.shape == naive.shape and (entropy > 0).all()


def test_tokenizer_and_model_round_trip(tiny_model_dir, tiny_tokenizer):
    tok = load_tokenizer(tiny_model_dir)
    text = "12+34=\\boxed{46}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.pad_token_id == tiny_tokenizer.pad_token_id and tok.padding_side == "left"
    model = load_model(tiny_model_dir)
    assert model.config.model_type == "minimax" and model.config._experts_implementation == "eager"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_hf_directories_load_and_train_through_the_fp32_head(tmp_path, tiny_tokenizer, arch):
    """A saved tiny Llama/Qwen2 with its tokenizer: load_model, the engine's cache, and the trainer's
    LogprobModel (cispo.trainer reads causal_lm.model and causal_lm.lm_head.weight)."""
    from cispo.trainer import LogprobModel

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]
    config = config_class(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model_class(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert type(model) is model_class and len(load_tokenizer(tmp_path)) == len(tiny_tokenizer)
    assert not any(isinstance(s, RecurrentSlot) for s in new_cache(model).layers)
    ids = torch.randint(4, len(tiny_tokenizer), (2, 9))
    logp, entropy = LogprobModel(model)(ids)
    expected = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(2, ids[:, 1:, None])[..., 0]
    assert (logp - expected).abs().max() < 1e-5
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.embed_tokens.weight.grad is not None


def test_layer_kinds_the_engine_cannot_batch_are_named():
    config = Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         layer_types=["full_attention", "sliding_attention"], use_sliding_window=True, sliding_window=8)
    with pytest.raises(ValueError, match="layer 1 is 'sliding_attention'"):
        new_cache(Qwen2ForCausalLM(config))
