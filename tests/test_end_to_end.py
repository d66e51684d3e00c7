"""The whole slice, really run: Ray rollout worker, DeepSpeed trainer, math-verify reward, CISPO loss."""
import json

from cispo.config import load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from tests.conftest import REPO

# One-digit addition learns fast enough for a short warm start; the seed is fixed.
SHORT = ["data.digits=1", "data.eval_size=20", "data.prompts_per_step=8", "sft.steps=60",
         "run.max_steps=24", "optim.lr=1e-4", "optim.warmup_steps=2", "wandb.mode=disabled", "run.threads=1"]


def test_short_run_raises_reward_and_writes_its_records(ray_session, tmp_path):
    recipe = load_recipe(REPO / "recipes/tiny-arith.yaml", SHORT + [f"run.dir={tmp_path / 'run'}"])
    summary = train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 25))
    first, last = rows[:6], rows[-6:]
    mean = lambda rs: sum(r["reward_mean"] for r in rs) / len(rs)
    assert mean(last) > mean(first), (mean(first), mean(last))
    for key in ["response_length_p99", "clip_fraction", "is_weight_mean", "is_weight_max", "entropy",
                "grad_norm", "time_rollout_s", "time_reward_s", "time_train_s", "time_sync_s"]:
        assert all(key in r for r in rows), key
    assert all(r["is_weight_max"] >= r["is_weight_mean"] > 0 for r in rows)
    saved = json.loads((tmp_path / "run/summary.json").read_text())
    assert saved["steps"] == 24 and saved["eval_accuracy_end"] == summary["eval_accuracy_end"]
    assert load_recipe(tmp_path / "run/config.yaml").run.max_steps == 24
    # Export round-trip: the newest checkpoint, loaded by AutoModelForCausalLM, is the trainer's model.
    import torch
    from transformers import AutoModelForCausalLM

    from cispo.export import export
    from rollout.engine import Request, SamplingParams, generate
    from rollout.model import load_tokenizer

    export(tmp_path / "run", tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final").eval()
    tok = load_tokenizer(tmp_path / "exported")
    prompts = [[tok.bos_token_id] + tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"] for a, b in [(3, 4), (9, 9)]]
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=(tok.eos_token_id,))
    run = lambda model: [c.token_ids for c in generate(model, [Request(p, params=greedy) for p in prompts], tok.pad_token_id)]
    assert run(exported) == run(trained)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in exported.state_dict().items())


def test_staged_recipe_advances_windows_and_logs_the_rule(ray_session, tmp_path):
    recipe = load_recipe(REPO / "recipes/tiny-staged.yaml", [
        "data.digits=1", "data.eval_size=10", "data.prompts_per_step=4", "rollout.n_samples=4", "sft.steps=20",
        "sft.stop_at_accuracy=null", "run.max_steps=8", "stages.max_steps_per_stage=3", "run.threads=1",
        "wandb.mode=disabled", f"run.dir={tmp_path / 'staged'}"])
    train(recipe)
    rows = read_metrics(tmp_path / "staged")
    windows = [r["window"] for r in rows]
    assert windows[0] == 10 and windows[-1] == 12 and windows == sorted(windows)
    moves = [r for prev, r in zip(rows, rows[1:]) if r["window"] != prev["window"]]
    assert len(moves) == 2 and all(r["stage_reason"] for r in moves)
    assert all(r["stage_reason"] is None for r in rows if r not in moves)
    assert all(r["response_length_p99"] <= r["window"] for r in rows)
