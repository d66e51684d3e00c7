"""Every family the engine runs, trained through the recipe path: a tiny random model of the family saved as an
HF directory, `model.path=DIR`, ZeRO-3 with the family's MoE blocks as leaves, the rollout engine on its states
(GDN, KDA and Mamba2 recurrent and conv states, lightning KᵀV, softmax KV), 3 RL steps each."""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from cispo.config import RecipeError, load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from rollout.model import build_model, save_model
from tests.conftest import REPO

# The list: Qwen3.5, Qwen3.5-MoE, Qwen3-Next (GDN), Kimi Linear (KDA), Nemotron-H (Mamba2),
# MiniMax (lightning, preset `tiny`) and Llama (dense: any HF causal LM's path, from a model directory).
FAMILIES = ["tiny-qwen3_5", "tiny-qwen3_5_moe", "tiny-qwen3_next", "tiny-kimi_linear", "tiny-nemotron_h", "tiny",
            "tiny-llama"]


def three_rl_steps(tmp_path, *overrides: str) -> list[dict]:
    """Three RL steps of tiny-arith on the model saved in tmp_path/model, with `overrides`; the metrics rows.

    A random model earns no math reward; DAPO's soft overlong penalty over the last 8 of 12 tokens gives
    the samples of a group different rewards (their lengths differ), so every step's update moves the weights.
    """
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", [
        f"model.path={tmp_path / 'model'}", f"run.dir={tmp_path / 'run'}", "run.max_steps=3", "data.digits=1",
        "data.eval_size=8", "data.prompts_per_step=4", "sft.steps=0", "optim.lr=1e-3", "optim.warmup_steps=0",
        "algorithm.overlong=soft", "algorithm.overlong_buffer=8", "algorithm.dynamic_sampling=false",
        "algorithm.old_logprobs=recompute", "wandb.mode=disabled", "run.threads=1", *overrides])
    train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("preset", FAMILIES)
def test_three_rl_steps_on_a_model_directory(ray_session, tiny_tokenizer, tmp_path, preset):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_model(preset, len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    save_model(model, tok, tmp_path / "model")
    rows = three_rl_steps(tmp_path, "trainer.zero_stage=3")
    # The engine's logprobs are the ZeRO-3 trainer's chunked fp32-head logprobs, step after step: each step's
    # updated weights reached the worker before the next rollout, and every state was forked per group.
    gaps = [r["old_logprob_gap"] for r in rows]
    print(f"{preset}: old_logprob_gap {gaps}")
    assert max(gaps) <= 1e-4, gaps
    assert all(r["grad_norm"] > 0 for r in rows), [r["grad_norm"] for r in rows]
    # The run's final model is the family's own class, as transformers loads it, with moved weights.
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final")
    assert type(trained) is type(model)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in trained.state_dict().items())


def test_cispo_train_refuses_an_unsupported_layer_before_weights_load_or_ray(tmp_path):
    # Qwen2 with its sliding window on: the layers past max_window_layers are sliding-window attention.
    Qwen2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, use_sliding_window=True,
                sliding_window=16, max_window_layers=1).save_pretrained(tmp_path / "model")  # no weights
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", [f"model.path={tmp_path / 'model'}",
                                                             f"run.dir={tmp_path / 'run'}"])
    with pytest.raises(RecipeError, match=r"command line: qwen2 layer 1 is 'sliding_attention'; the rollout engine "
                                          r"runs full_attention, linear_attention"):
        train(recipe)
