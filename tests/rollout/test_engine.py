import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rollout import engine
from rollout.engine import generate
from rollout.model import build_hybrid, fp32_logits, use_decode_attention
from rollout.trajectory import Request, SamplingParams
from tests.conftest import M1_TWO_LAYERS
from tests.rollout.reference import teacher_forced

PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11], [1, 7], [1, 9, 10, 11, 12]]
ARCHITECTURES = ["minimax", "llama", "qwen2"]
DENSE = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def _model(arch="minimax", **overrides):
    """A tiny random model: M1's hybrid layout in two layers (every join, leave and fork still crosses both
    kinds of state; blocks of 16 make the longer rows span several), or a dense Llama/Qwen2 layout with
    grouped-query heads."""
    torch.manual_seed(0)
    if arch == "minimax":
        return build_hybrid("tiny", 32, **{**M1_TWO_LAYERS, **overrides}).eval()
    config_class, model_class = DENSE[arch]
    shape = dict(vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False)
    return model_class(config_class(**{**shape, **overrides})).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logprobs_match_teacher_forced_forward_across_mixed_prompts_and_groups(arch):
    model = _model(arch)
    params = SamplingParams(max_new_tokens=24, temperature=0.7)
    out = generate(model, [Request(p, n=3, seed=i, params=params) for i, p in enumerate(PROMPTS)], pad_id=0)
    assert [c.prompt_ids for c in out] == [p for p in PROMPTS for _ in range(3)]  # request order, then sample order
    for c in out:
        expected = teacher_forced(model, c.prompt_ids, c.response_ids, temperature=0.7)
        assert (expected - torch.tensor(c.logprobs)).abs().max() < 1e-4


def _mixed_requests(temperature, longest=300):
    """Mixed prompt lengths, budgets and filters: short budgets leave early, so queued requests join later."""
    budgets = [40, 6, longest, 12, 20]
    prompts = PROMPTS + [[1] + list(range(4, 30)), [1, 4]]
    return [Request(p, n=1 + i % 3, seed=7 * i, params=SamplingParams(
                max_new_tokens=b, temperature=temperature, top_k=8 * (i % 2), top_p=0.9 if i == 2 else 1.0))
            for i, (p, b) in enumerate(zip(prompts, budgets))]


# The 300-token budget, which outgrows the KV's first allocation, runs once: KVSlot is every family's KV,
# so the other layouts check joins and leaves on 60-token budgets.
@pytest.mark.parametrize("arch, attention, longest", [("minimax", "decode", 300), ("llama", "decode", 60),
                                                      ("qwen2", "decode", 60), ("minimax", "sdpa", 60)])
def test_logprobs_match_teacher_forced_forward_across_joins_and_leaves(monkeypatch, arch, attention, longest):
    # The workers' decode attention, with grouped-query heads, against SDPA's full forward.
    model = _model(arch, num_key_value_heads=2)
    if attention == "decode":
        use_decode_attention(model)
    joins = []  # rows running when a new prefill joined them
    real_join = engine._join
    monkeypatch.setattr(engine, "_join", lambda batch, new: joins.append(batch and len(batch.samples)) or
                        real_join(batch, new))
    requests = _mixed_requests(temperature=0.8, longest=longest)
    out = generate(model, requests, pad_id=0, max_batch_rows=4)
    assert sum(1 for j in joins if j) >= 2, joins  # queued requests joined running rows
    # At 300 the longest request outgrows the KV's first allocation (length + 256 positions).
    assert max(len(c.response_ids) for c in out) == longest
    for c in out:
        expected = teacher_forced(model, c.prompt_ids, c.response_ids, temperature=0.8)
        assert (expected - torch.tensor(c.logprobs)).abs().max() < 1e-4


def _view(completions):
    return [(c.prompt_ids, c.response_ids, c.finish_reason) for c in completions]


@pytest.mark.parametrize("arch", ["minimax", "llama"])
def test_outputs_do_not_depend_on_batch_composition_or_admission_order(arch):
    model = _model(arch)
    for temperature in (0.0, 1.0):
        requests = _mixed_requests(temperature, longest=60)
        alone = [c for r in requests for c in generate(model, [r], 0)]
        for rows in (3, 256):
            assert _view(generate(model, requests, 0, max_batch_rows=rows)) == _view(alone)
        # Admitted in reverse order, beside other rows: each request's samples are unchanged.
        reverse = iter(generate(model, requests[::-1], 0, max_batch_rows=4))
        per_request = [[next(reverse) for _ in range(r.n)] for r in requests[::-1]][::-1]
        assert _view([c for samples in per_request for c in samples]) == _view(alone)


def test_seeds_and_top_k_top_p_shape_samples():
    model = _model()
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, top_k=5)
    out = generate(model, [Request(PROMPTS[1], n=2, seed=11, params=params)], 0)
    other_seed = generate(model, [Request(PROMPTS[1], n=2, seed=12, params=params)], 0)
    assert [c.response_ids for c in other_seed] != [c.response_ids for c in out]
    for c in out:  # every sampled token was among the 5 most likely
        ids = torch.tensor([PROMPTS[1] + c.response_ids])
        with torch.no_grad():
            logits = fp32_logits(model, model.model(input_ids=ids).last_hidden_state[0, len(PROMPTS[1]) - 1:-1])
        ranks = (logits > logits.gather(1, torch.tensor(c.response_ids)[:, None])).sum(1)
        assert (ranks < 5).all()


def test_finish_reasons_stop_length_and_repetition():
    model = _model()
    greedy = generate(model, [Request(PROMPTS[0], params=SamplingParams(max_new_tokens=15, temperature=0))], 0)[0]
    assert greedy.finish_reason == "length" and len(greedy.response_ids) == 15
    stop_at = greedy.response_ids[4]
    first = greedy.response_ids.index(stop_at)
    stopped = generate(model, [Request(PROMPTS[0], params=SamplingParams(
        max_new_tokens=15, temperature=0, stop_token_ids=(stop_at,)))], 0)[0]
    assert stopped.finish_reason == "stop" and stopped.response_ids == greedy.response_ids[:first + 1]


def test_repetition_stop_triggers_on_confident_runs_only():
    params = SamplingParams(max_new_tokens=200, temperature=1.0, repetition_tokens=20, repetition_prob=0.99)
    # Constructed case: a head scaled 1e5x makes every sampled token near-certain (p > 0.99).
    sharp = _model()
    sharp.lm_head.weight.data *= 1e5
    out = generate(sharp, [Request(PROMPTS[0], n=2, seed=1, params=params)], 0)
    assert all(c.finish_reason == "repetition" and len(c.response_ids) == 20 for c in out)
    out = generate(_model(), [Request(p, n=4, seed=2, params=params) for p in PROMPTS], 0)
    assert all(c.finish_reason == "length" and len(c.response_ids) == 200 for c in out)


def test_stop_strings_end_generation_on_decoded_text(tiny_model_dir, tiny_tokenizer):
    from rollout.model import load_model

    model, tok = load_model(tiny_model_dir).eval(), tiny_tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
    greedy = SamplingParams(max_new_tokens=30, temperature=0)
    free = generate(model, [Request(PROMPTS[0], params=greedy)], 0)[0]
    # A stop string of two characters the free run produced (ids >= 4 are characters, one each);
    # the oracle is the shortest prefix whose whole text contains it.
    i = next(i for i in range(3, 28) if min(free.response_ids[i:i + 2]) >= 4)
    stop = decode(free.response_ids[i:i + 2])
    first = next(k for k in range(1, 31) if stop in decode(free.response_ids[:k]))
    params = SamplingParams(max_new_tokens=30, temperature=0, stop_strings=(stop,))
    stopped = generate(model, [Request(PROMPTS[0], params=params)], 0, decode=decode)[0]
    assert stopped.finish_reason == "stop" and stopped.response_ids == free.response_ids[:first]
    assert decode(stopped.response_ids).endswith(stop)
    with pytest.raises(ValueError, match="decode"):
        generate(_model(), [Request(PROMPTS[0], params=SamplingParams(stop_strings=("x",)))], 0)


def _turns(model, kept, rows=2, turns=3, inserted=((3, 4), (5, 6, 7), (3, 4))):
    """Three sessions of `turns` turns each, played in one engine call per turn: each turn's prompt is the
    last turn's prompt and response, then a few inserted tokens (different lengths per session, so the
    resumed rows are grouped and padded). Returns each turn's trajectories."""
    params = SamplingParams(max_new_tokens=9, temperature=0.9, stop_token_ids=(2,))
    prompts, out = [list(p) for p in PROMPTS], []
    for turn in range(turns):
        step = generate(model, [Request(p, seed=10 * turn + i, params=params, session=100 + i)
                                for i, p in enumerate(prompts)], pad_id=0, max_batch_rows=rows, kept=kept)
        prompts = [t.prompt_ids + t.response_ids + list(inserted[i]) for i, t in enumerate(step)]
        out.append(step)
    return out


@pytest.mark.parametrize("arch", ["minimax", "llama"])
def test_a_kept_session_state_gives_the_logprobs_of_re_prefilling_its_history(arch):
    model = _model(arch)
    use_decode_attention(model)
    kept = _turns(model, engine.KeptStates(limit=8))
    again = _turns(model, None)  # every turn prefills its whole history
    assert [[t.outcomes["state_kept"] for t in step] for step in kept] == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert [[t.outcomes["state_kept"] for t in step] for step in again] == [[0, 0, 0]] * 3
    for step_kept, step_again in zip(kept, again):
        for a, b in zip(step_kept, step_again):
            assert a.prompt_ids == b.prompt_ids and a.response_ids == b.response_ids
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4
            forced = teacher_forced(model, a.prompt_ids, a.response_ids, temperature=0.9)
            assert (forced - torch.tensor(a.logprobs)).abs().max() <= 1e-4


def test_sessions_past_the_bound_are_evicted_counted_and_re_prefilled():
    model = _model()
    use_decode_attention(model)
    store = engine.KeptStates(limit=2)
    out = _turns(model, store, rows=3)
    # Three sessions into room for two: each turn's third keep evicts one, whose next turn re-prefills.
    assert store.evictions == 3 and len(store.states) == 2
    assert [sorted(t.outcomes["state_kept"] for t in step) for step in out][1:] == [[0, 1, 1], [0, 1, 1]]
    again = _turns(model, None, rows=3)
    assert all(a.response_ids == b.response_ids for sa, sb in zip(out, again) for a, b in zip(sa, sb))
    # A prompt that does not extend the kept tokens is not resumed from them.
    assert store.take(101, [1, 2, 3]) is None and 101 not in store.states
