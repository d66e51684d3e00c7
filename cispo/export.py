"""`cispo export`: a checkpoint as a `save_pretrained` directory that any HF stack loads."""
from __future__ import annotations

from pathlib import Path

from cispo import checkpoint
from cispo.config import RecipeError
from rollout.model import load_model, load_tokenizer, save_model


def export(run_dir: str | Path, out_dir: str | Path, step: int | None = None) -> Path:
    run_dir = Path(run_dir)
    found = {int(p.name.split("-")[1]): p for p in checkpoint.complete_checkpoints(run_dir)}
    if not found:
        raise RecipeError(f"{run_dir} holds no complete checkpoint")
    if step is not None and step not in found:
        raise RecipeError(f"{run_dir} has no checkpoint for step {step}; it has steps {sorted(found)}")
    path = found[step if step is not None else max(found)]
    model = trained_model(path, run_dir / "init")
    save_model(model, load_tokenizer(run_dir / "init"), out_dir)
    return path


def trained_model(checkpoint_dir: str | Path, model_dir: str | Path):
    """The model of `model_dir` with a checkpoint's fp32 master weights, gathered from every rank's
    partition (ZeRO 0-3)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from cispo.trainer import LogprobModel

    model = load_model(model_dir)
    # The trainer's module wraps the causal LM (cispo.trainer.LogprobModel), so its names do too.
    LogprobModel(model).load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="state"))
    return model
