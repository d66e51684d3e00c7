"""Every linear-state family through the engine: Gated DeltaNet (Qwen3.5, Qwen3.5-MoE, Qwen3-Next), KDA
(Kimi Linear, Ling 2.5's bailing_hybrid), Mamba2 (Nemotron-H), each a tiny random model built offline
from its preset, in fp32. Greedy decoding and the fork also run on MiniMax (lightning, preset `tiny`) and
Llama (dense); their logprob parity across joins and leaves is in test_engine.py."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig

from rollout import engine
from rollout.config import RolloutConfig
from rollout.engine import CispoEngine, Request, SamplingParams, decode_step, generate
from rollout.families import family_of
from rollout.model import build_model, head_logits, load_model, new_cache, use_decode_attention
from rollout.states import KeptStates, RecurrentSlot
from tests.rollout.reference import teacher_forced
from tests.rollout.test_engine import _turns

PRESETS = ["tiny-qwen3_5", "tiny-qwen3_5_moe", "tiny-qwen3_next", "tiny-kimi_linear", "tiny-bailing_hybrid",
           "tiny-nemotron_h"]
# Issue 18's seven families, one preset each.
FAMILIES = ["tiny-qwen3_5", "tiny-qwen3_5_moe", "tiny-qwen3_next", "tiny-kimi_linear", "tiny-nemotron_h", "tiny",
            "tiny-llama"]
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 7], [1, 9, 10, 11, 12]]


def _model(preset):
    torch.manual_seed(0)
    return build_model(preset, 32, pad_token_id=0).eval()


@pytest.mark.parametrize("preset", PRESETS)
def test_logprobs_match_teacher_forced_forward_across_forks_joins_and_leaves(monkeypatch, preset):
    # The model as a rollout worker runs it (decode attention, grouped-GEMM experts), against the same
    # weights as plain transformers builds them (SDPA, eager experts).
    model, reference = _model(preset), _model(preset)
    CispoEngine(model, RolloutConfig(), pad_id=0)
    joins = []  # rows running when a new prefill joined them
    real_join = engine._join
    monkeypatch.setattr(engine, "_join", lambda batch, new: joins.append(batch and len(batch.samples)) or
                        real_join(batch, new))
    # Mixed prompt lengths (left padding), n > 1 (forks) and budgets that finish rows early, so that
    # queued requests join running rows.
    requests = [Request(p, n=2, seed=i, params=SamplingParams(max_new_tokens=b, temperature=0.8))
                for i, (p, b) in enumerate(zip(PROMPTS + [[1, 4]], [14, 3, 8, 6]))]
    out = generate(model, requests, pad_id=0, max_batch_rows=4)
    assert sum(1 for j in joins if j) >= 2, joins
    worst = max(float((teacher_forced(reference, c.prompt_ids, c.response_ids, temperature=0.8)
                       - torch.tensor(c.logprobs)).abs().max()) for c in out)
    print(f"{preset}: max |Δlogprob| {worst:.2e} over {sum(len(c.response_ids) for c in out)} tokens")
    assert worst < 1e-4


@pytest.mark.parametrize("preset", FAMILIES)
def test_greedy_tokens_equal_hf_generate(preset):
    # The engine as a worker runs it (decode attention and forwards, grouped-GEMM experts) against plain
    # transformers with the same weights; prompts of mixed lengths share a batch, left-padded.
    model, reference = _model(preset), _model(preset)
    engine = CispoEngine(model, RolloutConfig(), pad_id=0)
    ours = engine.generate([Request(p, params=SamplingParams(max_new_tokens=10, temperature=0)) for p in PROMPTS])
    for prompt, c in zip(PROMPTS, ours):
        ids = torch.tensor([prompt])
        hf = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                do_sample=False, pad_token_id=0, eos_token_id=None)
        assert c.response_ids == hf[0, len(prompt):].tolist()


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen3_5_moe"])
def test_expert_weights_keep_the_engines_layout_through_weight_updates(preset):
    # The engine stores [experts, out, in] weights transposed in memory (grouped GEMMs read them faster on
    # the CPU); a weight update must write the new values into that layout, or the speed-up silently goes.
    engine = CispoEngine(_model(preset), RolloutConfig(), pad_id=0)
    new = {k: v + 0.5 if ".experts." in k else v for k, v in _model(preset).state_dict().items()}
    engine.load_weights(new, 1)
    experts = [(n, p) for n, p in engine.model.named_parameters() if ".experts." in n]
    assert experts
    for n, p in experts:
        assert p.mT.is_contiguous() and not p.is_contiguous(), n
        assert torch.equal(p, new[n]), n


def _prefill(model, prompts):
    """A left-padded prefill of `prompts` into a fresh cache; returns (cache, mask, last logits)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (ids != 0).long()
    cache = new_cache(model)
    with torch.no_grad():
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                          cache=cache, use_cache=True)
    return cache, mask, head_logits(model, out.last_hidden_state[:, -1])


def _forked_step_error(model, rows: list[int]) -> float:
    """Prefill PROMPTS[0] and PROMPTS[2] together, fork the rows to `rows`, decode one token; the largest
    logit gap to each prompt prefilled alone and decoded the same way."""
    pair = [PROMPTS[0], PROMPTS[2]]
    cache, mask, _ = _prefill(model, pair)
    index = torch.tensor(rows)
    cache.select(index)
    mask = torch.nn.functional.pad(mask[index], (0, 1), value=1)
    with torch.no_grad():
        forked = decode_step(model, cache, mask, mask.sum(1) - 1, torch.full((len(rows),), 3))
    worst = 0.0
    for i, r in enumerate(rows):
        alone, alone_mask, _ = _prefill(model, [pair[r]])
        alone_mask = torch.nn.functional.pad(alone_mask, (0, 1), value=1)
        with torch.no_grad():
            expected = decode_step(model, alone, alone_mask, alone_mask.sum(1) - 1, torch.tensor([3]))
        worst = max(worst, float((forked[i] - expected[0]).abs().max()))
    return worst


@pytest.mark.parametrize("preset", FAMILIES)
def test_a_forked_row_decodes_as_its_prompt_alone(preset):
    # One prefill serves n samples: every state the family keeps (KV, matrix, conv) is copied per row.
    model = _model(preset)
    use_decode_attention(model)
    assert _forked_step_error(model, [1, 1, 0, 1]) < 1e-4


@pytest.mark.parametrize("preset", ["tiny-qwen3_5", "tiny-kimi_linear", "tiny-nemotron_h"])
def test_fork_copies_matrix_and_conv_state(monkeypatch, preset):
    model = _model(preset)
    slots = [s for s in new_cache(model).layers if isinstance(s, RecurrentSlot)]
    assert slots, preset
    # The fork copying only the matrix state leaves each row's conv state with the other prompt:
    # the conv state carries the last 4 inputs, so forgetting it changes the next token's logits.
    monkeypatch.setattr(RecurrentSlot, "select", lambda self, rows, drop_left=0: self.recurrent_states.update(
        {i: s[rows] for i, s in self.recurrent_states.items() if s is not None}))
    assert _forked_step_error(model, [1, 0]) > 1e-3


def test_moe_blocks_are_the_zero3_leaves_of_each_family():
    leaves = {p: sorted(t.__name__ for t in family_of(m.config).leaf_modules(m))
              for p in ("tiny-qwen3_5", "tiny-qwen3_5_moe", "tiny-nemotron_h", "tiny") for m in [_model(p)]}
    assert leaves == {"tiny-qwen3_5": [], "tiny-qwen3_5_moe": ["Qwen3_5MoeSparseMoeBlock"],
                      "tiny-nemotron_h": ["NemotronHMoE"], "tiny": ["MiniMaxSparseMoeBlock"]}


def test_a_model_type_without_an_adapter_is_refused_by_name():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match=r"model type 'gpt2' has no rollout engine adapter; supported: .*qwen3_5"):
        new_cache(model)
    with pytest.raises(ValueError, match="unknown model preset 'tiny-gpt2'; valid presets: .*tiny-nemotron_h"):
        build_model("tiny-gpt2", 32)


@pytest.mark.parametrize("preset", ["tiny-qwen3_5", "tiny-kimi_linear", "tiny-nemotron_h", "tiny-bailing_hybrid"])
def test_a_kept_session_state_continues_each_family_as_re_prefilling_does(preset):
    # A resumed turn feeds several tokens onto a kept matrix and conv state: each family's chunked path
    # must continue from it exactly as its prefill of the whole history does.
    model = _model(preset)
    use_decode_attention(model)
    kept, again = _turns(model, KeptStates(limit=8)), _turns(model, None)
    assert [[t.outcomes["state_kept"] for t in step] for step in kept] == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    for a, b in (pair for sa, sb in zip(kept, again) for pair in zip(sa, sb)):
        assert a.response_ids == b.response_ids
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4


@pytest.mark.parametrize("config, error", [
    (GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2),
     r"model type 'gpt2' has no rollout engine adapter; supported: llama, .*minimax, .*qwen3_5, .*nemotron_h"),
    (MistralConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, sliding_window=16),
     r"mistral layer 0 is 'sliding_attention'; the rollout engine runs full_attention, linear_attention"),
])
def test_a_model_directory_is_refused_from_its_config_before_weights_load(tmp_path, config, error):
    # config.json only: were the weights read, the error would be transformers' missing-weights OSError.
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=error):
        load_model(tmp_path)
    # Without the window the same Mistral layout is dense softmax, which the engine runs.
    if config.model_type == "mistral":
        config.sliding_window = None
        config.save_pretrained(tmp_path)
        with pytest.raises(OSError, match="model.safetensors"):
            load_model(tmp_path)


def test_kimi_mla_decodes_from_the_latent_cache_without_re_expanding_it():
    # Upstream MLA runs every cached latent through kv_b_proj at each step (work growing with context); the
    # engine's replica absorbs kv_b_proj into the query and output, so after the prefill it never runs.
    model, reference = _model("tiny-kimi_linear"), _model("tiny-kimi_linear")
    CispoEngine(model, RolloutConfig(), pad_id=0)
    rows_expanded = []
    for m in model.modules():
        if type(m).__name__ == "KimiLinearAttention":
            m.kv_b_proj.register_forward_hook(lambda mod, args, out: rows_expanded.append(args[0].shape[-2]))
    out = generate(model, [Request(PROMPTS[0], params=SamplingParams(max_new_tokens=12, temperature=0))], 0)
    assert rows_expanded == [len(PROMPTS[0])], rows_expanded  # the prefill's latents only
    ids = torch.tensor([PROMPTS[0] + out[0].response_ids])
    with torch.no_grad():
        greedy = reference(input_ids=ids).logits[0, len(PROMPTS[0]) - 1:-1].argmax(-1)
    assert out[0].response_ids == greedy.tolist()
