"""A Gated DeltaNet MoE model (Qwen3.5-MoE layout) trained through the recipe path: saved as an HF directory,
`model.path=DIR`, ZeRO-3 with the family's MoE blocks as leaves, the rollout engine on its GDN states."""
import pytest
import torch

from cispo.config import load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from rollout.model import build_model, save_model
from tests.conftest import REPO


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
def test_three_rl_steps_on_a_qwen3_5_moe_directory(ray_session, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    torch.manual_seed(0)
    model = build_model("tiny-qwen3_5_moe", len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                        eos_token_id=tok.eos_token_id)
    save_model(model, tok, tmp_path / "model")
    rows = three_rl_steps(tmp_path, "trainer.zero_stage=3")
    # The engine's logprobs (GDN recurrent and conv states, forked per group) are the ZeRO-3 trainer's,
    # step after step: each step's updated weights reached the worker before the next rollout.
    assert max(r["old_logprob_gap"] for r in rows) <= 1e-4, [r["old_logprob_gap"] for r in rows]
    assert all(r["grad_norm"] > 0 for r in rows), [r["grad_norm"] for r in rows]
