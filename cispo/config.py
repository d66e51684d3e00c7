"""One typed config tree; each package owns its section, YAML recipes mirror it key for key."""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewards.config import RewardConfig
from rollout.config import ModelConfig, RolloutConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    dir: str = Field("runs/default", description="run directory: config.yaml, metrics.jsonl, summary.json, ckpt/")
    seed: int = Field(0, description="seeds data order, sampling and initialization")
    max_steps: int = Field(100, ge=0, description="RL steps")
    resume: bool = Field(False, description="continue from the newest checkpoint in run.dir")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after RL)")
    threads: int = Field(0, ge=0, description="torch threads per actor; 0 uses every core")


class DataConfig(Section):
    source: Literal["arith", "jsonl"] = Field("arith", description="generated arithmetic, or a JSONL file")
    path: str | None = Field(None, description="JSONL with 'prompt' and 'answer' (or GSM8K 'question'/'answer')")
    eval_path: str | None = Field(None, description="held-out JSONL for evaluation")
    digits: int = Field(2, ge=1, le=6, description="arith: operand digits")
    eval_size: int = Field(200, ge=1, description="held-out prompts scored before and after RL")
    prompts_per_step: int = Field(16, ge=1, description="prompts per RL step (each sampled n times)")


class AlgorithmConfig(Section):
    name: Literal["cispo"] = "cispo"
    eps_high: float = Field(..., gt=0, description="upper clip of the IS weight; M1 does not publish it, so recipes state it")
    eps_low: float | None = Field(None, gt=0, description="lower clip; M1 uses none")
    normalization: Literal["group", "token"] = Field("group", description="group: 1/Σ|o_i| per prompt (Eq. 4)")
    updates_per_batch: int = Field(16, ge=1, description="off-policy minibatch updates per generation batch (M1: 16)")


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0)
    betas: tuple[float, float] = Field((0.9, 0.95), description="M1's AdamW betas")
    eps: float = Field(1e-15, gt=0, description="M1: 1e-8 stalls because most gradients are below 1e-14")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up, in optimizer steps")


class SFTConfig(Section):
    steps: int = Field(0, ge=0, description="supervised warm-start steps before RL (0: none)")
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)


class TrainerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks, one Ray actor each")
    zero_stage: int = Field(2, ge=0, le=3)
    micro_batch_size: int = Field(64, ge=1, description="sequences per forward/backward")
    deepspeed: dict = Field(default_factory=dict, description="merged over the generated DeepSpeed config")


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "cispo"


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class RecipeError(ValueError):
    """A recipe problem, phrased as one line naming the file and the key."""


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += _valid_keys(field.annotation, prefix + name + ".")
    return keys


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise RecipeError(f"override {dotted}: {p!r} is not a section")
    tree[leaf] = yaml.safe_load(raw) if raw != "" else None


def _explain(err: ValidationError, where: str) -> RecipeError:
    e = err.errors()[0]
    key = ".".join(str(p) for p in e["loc"])
    if e["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _valid_keys(Recipe), n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RecipeError(f"{where}: unknown key '{key}'{hint}")
    if e["type"] == "missing":
        return RecipeError(f"{where}: missing required key '{key}'")
    return RecipeError(f"{where}: key '{key}' = {e.get('input')!r}: {e['msg']}")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply `key=value` overrides, validate; errors are one line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{line}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise RecipeError(f"override {item!r} is not key=value")
        _set_dotted(tree, key.strip(), value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, str(path)) from None


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
