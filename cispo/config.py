"""One typed config tree; each package owns its section, YAML recipes mirror it key for key."""
from __future__ import annotations

import difflib
import importlib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator,
                      model_validator)

from rewards.config import RewardConfig
from rollout.config import ModelConfig, RolloutConfig


def registry(path: str):
    """The registry at 'module:NAME' (cispo.registry.Registry). Imported on use: those modules import this one."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def choice(path: str, description: str, default=...):
    """A field whose value must be a name registered in the registry at `path` ('module:NAME');
    the valid names are those registered, so adding a choice never touches the config."""
    return Field(default, description=description, json_schema_extra={"choices": path})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*")
    @classmethod
    def _registered(cls, v, info):
        extra = cls.model_fields[info.field_name].json_schema_extra or {}
        if "choices" in extra and v is not None:
            registry(extra["choices"])[v]  # ValueError naming the valid choices
        return v


class RunConfig(Section):
    dir: str = Field("runs/default", description="run directory: config.yaml, metrics.jsonl, summary.json, ckpt/")
    seed: int = Field(0, description="seeds data order, sampling and initialization")
    max_steps: int = Field(100, ge=0, description="RL steps")
    resume: bool = Field(False, description="continue from the newest complete checkpoint in run.dir")
    save_every: int = Field(10, ge=1, description="checkpoint every N RL steps (and at the last step)")
    keep_last: int = Field(2, ge=1, description="complete checkpoints kept; older ones are deleted")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only before and after RL)")
    threads: int = Field(0, ge=0, description="torch threads per actor; 0 uses every core")


class SourceConfig(Section):
    name: str = Field(..., description="names the source in metrics and in reward.sources")
    format: str = choice("cispo.data:FORMATS", "how rows are read: arith (generated, no file); jsonl: "
                         "'prompt'/'answer'[/'target']; gsm8k; math: 'problem'/'solution' with \\boxed{}; apps; "
                         "humaneval", "jsonl")
    path: str | None = Field(None, description="training rows (.jsonl or .jsonl.gz); not for arith")
    eval_path: str | None = Field(None, description="held-out rows in the same format")
    weight: float = Field(1.0, ge=0, description="share of each batch, relative to the other active sources")
    start_step: int = Field(0, ge=0, description="curriculum: the RL step at which this source joins the mix")
    ramp_steps: int = Field(0, ge=0, description="curriculum: steps over which its weight rises from 0 to weight")


class DataConfig(Section):
    source: str = choice("cispo.data:FORMATS", "the single source's format when data.sources is empty", "arith")
    path: str | None = Field(None, description="JSONL with 'prompt' and 'answer' (or GSM8K 'question'/'answer')")
    eval_path: str | None = Field(None, description="held-out JSONL for evaluation")
    sources: list[SourceConfig] = Field(default_factory=list, description="a weighted mix of sources with a "
                                        "curriculum; replaces source/path/eval_path when given")
    on_bad_row: Literal["error", "skip"] = Field("error", description="a malformed row: stop with file:line, "
                                                 "or skip it and count it")
    digits: int = Field(2, ge=1, le=6, description="arith: operand digits")
    eval_size: int = Field(200, ge=1, description="held-out prompts scored before and after RL, per source")
    prompts_per_step: int = Field(16, ge=1, description="prompts per RL step (each sampled n times)")

    def mix(self) -> list[SourceConfig]:
        """The sources to draw from: `sources`, or the single source/path/eval_path as a one-source mix."""
        return self.sources or [SourceConfig(name=self.source, format=self.source, path=self.path,
                                             eval_path=self.eval_path)]

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, v):
        names = [s.name for s in v]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")
        if v and not any(s.weight > 0 and s.start_step == 0 for s in v):
            raise ValueError("at least one source needs weight > 0 and start_step 0, or the first batches are empty")
        return v


class AlgorithmConfig(Section):
    name: str = choice("cispo.loss:LOSSES", "the policy loss: cispo: M1 Eq. 4-5; cispo_masked: Eq. 6-7; "
                       "grpo/dapo/ppo: the PPO-clip surrogate", "cispo")
    eps_high: float = Field(..., gt=0, description="upper clip of the IS weight; M1 does not publish it, so recipes state it")
    eps_low: float | None = Field(None, gt=0, validate_default=True,
                                  description="lower clip; M1 uses none; PPO-clip losses need it (DAPO: 0.2)")
    normalization: str | None = Field(
        None, validate_default=True, json_schema_extra={"choices": "cispo.loss:NORMALIZATIONS"},
        description="group: 1/Σ|o_i| per prompt (Eq. 4); token: batch token mean; sequence: mean of response "
                    "means; sample_token: M1 80k's sample-level loss with token normalization; "
                    "unset: the loss's own (cispo group, grpo sequence, dapo/ppo token)")
    advantage: str = choice("cispo.advantages:ESTIMATORS",
                            "group_std: Eq. 2; no_std: Dr. GRPO; leave_one_out: RLOO baseline", "group_std")
    dynamic_sampling: bool = Field(True, description="drop prompt groups whose rewards all agree and refill (DAPO, M1)")
    max_refill_draws: int = Field(4, ge=0, description="dynamic sampling: most extra generation rounds per step")
    overlong: str = choice("cispo.sampling:OVERLONG", "responses cut by the budget or repetition: none keeps "
                           "them, zero sets their reward to 0, mask drops them from the loss, soft is DAPO's soft "
                           "overlong penalty", "none")
    overlong_buffer: int = Field(0, ge=0, description="soft: the last N tokens of the budget, where the penalty ramps")
    overlong_penalty: float = Field(1.0, ge=0, description="soft: the penalty at the budget")
    updates_per_batch: int = Field(16, ge=1, description="off-policy minibatch updates per generation batch (M1: 16)")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        "rollout", description="π_old of the IS weight: the rollout engine's logprobs, or the trainer's own forward "
                               "before the first update (one more forward per step; logs old_logprob_gap, the "
                               "train/inference mismatch M1 §3.2 fixed with the fp32 head)")

    @field_validator("eps_low")
    @classmethod
    def _clip_from_below_needs_eps_low(cls, v, info):
        name = info.data.get("name")
        if v is None and name and registry("cispo.loss:LOSSES")[name].meta["needs_eps_low"]:
            raise ValueError(f"{name} clips the ratio from below too; state eps_low (GRPO and DAPO use 0.2)")
        return v

    @field_validator("normalization")
    @classmethod
    def _default_normalization(cls, v, info):
        # Each loss's own paper normalizes differently (registered with the loss); a recipe value wins.
        name = info.data.get("name")
        return v if v is not None or not name else registry("cispo.loss:LOSSES")[name].meta["normalization"]


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0, description="peak learning rate of the RL updates (M1 does not publish it)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="M1's AdamW betas")
    eps: float = Field(1e-15, gt=0, description="M1: 1e-8 stalls because most gradients are below 1e-14")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    grad_clip: float = Field(1.0, gt=0, description="clip the global gradient norm to this (M1's 80k stage lowers it)")
    warmup_steps: int = Field(0, ge=0, description="linear LR warm-up, in optimizer steps")


class SFTConfig(Section):
    steps: int = Field(0, ge=0, description="most supervised warm-start steps before RL (0: none)")
    stop_at_accuracy: float | None = Field(None, gt=0, le=1, description="end the warm start once greedy eval "
                                           "accuracy reaches this (checked every eval_every steps)")
    eval_every: int = Field(50, ge=1, description="warm-start steps between accuracy checks")
    lr: float = Field(1e-3, gt=0, description="learning rate of the warm start (constant)")
    batch_size: int = Field(64, ge=1, description="prompts per warm-start step, each with its demonstration")


# The top-level keys DeepSpeed's own config parser reads (deepspeed.runtime.config.DeepSpeedConfig,
# DeepSpeed 0.19.8), written out because importing DeepSpeed imports torch; tests/cispo/test_first_contact.py
# records what that parser reads and fails when this list and it disagree.
DEEPSPEED_KEYS = frozenset("""
activation_checkpointing aio amp autotuning bf16 bfloat16 checkpoint comet comms_logger communication_data_type
compile compression_training csv_monitor curriculum_learning data_efficiency data_types dataloader_drop_last
datastates_ckpt disable_allgather disable_python_gc dump_state eigenvalue elasticity expert_parallel
flops_profiler fp16 gradient_accumulation_steps gradient_allreduce_op gradient_clipping gradient_predivide_factor
graph_harvesting hybrid_engine log_level managed_gradient_accumulation memory_breakdown nebula optimizer pipeline
prescale_gradients progressive_layer_drop quantize_training scheduler seq_parallel_communication_data_type
sparse_attention sparse_gradients steps_per_print tensor_parallel tensorboard timers torch_autocast
train_batch_size train_micro_batch_size_per_gpu use_data_before_expert_parallelism vocabulary_size
wall_clock_breakdown wandb weight_quantization zero_allow_untested_optimizer zero_force_ds_cpu_optimizer
zero_optimization
""".split())


def _deepspeed_key(key: str) -> str:
    # DeepSpeed ignores a top-level key it does not know, so a misspelled section would silently do nothing.
    if key not in DEEPSPEED_KEYS:
        close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"DeepSpeed has no top-level key {key!r}{hint}")
    return key


class TrainerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="DeepSpeed ranks, one Ray actor each")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 + "
                            "gradients, 3 + parameters sharded over the ranks")
    micro_batch_size: int = Field(64, ge=1, description="most sequences per forward/backward")
    micro_batch_tokens: int = Field(16384, ge=1, description="most padded tokens (sequences x longest) per "
                                    "forward/backward; a longer sequence goes alone (with length_bucketing)")
    length_bucketing: bool = Field(True, description="sort each minibatch by length before cutting micro-batches, so "
                                   "each pads only to rows of similar length; false: arrival order, micro_batch_size "
                                   "rows at a time (the baseline of benchmarks/train_throughput.py)")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward: less memory, "
                                         "about one more forward of time")
    deepspeed: dict[Annotated[str, AfterValidator(_deepspeed_key)], Any] = Field(
        default_factory=dict, description="merged key by key over the generated DeepSpeed config "
        "(cispo.trainer.deepspeed_config): bf16, zero_optimization.offload_optimizer, ...; top-level keys are "
        "checked against DeepSpeed's")

    @model_validator(mode="after")
    def _bf16_needs_zero(self):
        if self.deepspeed.get("bf16", {}).get("enabled") and self.zero_stage == 0:
            raise ValueError("bf16 needs zero_stage >= 1: DeepSpeed's stage-0 bf16 optimizer takes an Adam step with "
                             "zero gradients at start-up, so every later bias correction is off by one step")
        return self


class EvalConfig(Section):
    """`cispo eval` and the accuracy a run reports before and after RL use greedy decoding; `cispo eval`
    can estimate pass@k instead."""
    n_samples: int = Field(1, ge=1, description="cispo eval: samples per held-out prompt; 1 scores greedy accuracy")
    k: int = Field(1, ge=1, description="cispo eval: pass@k, the unbiased estimate from n_samples samples "
                                       "(Chen et al. 2021)")

    @model_validator(mode="after")
    def _k_at_most_n(self):
        if self.k > self.n_samples:
            raise ValueError(f"eval.k={self.k} needs at least that many eval.n_samples (got {self.n_samples})")
        return self


class EnvConfig(Section):
    """Multi-turn episodes against an environment: read by `rollout.function: cispo.multiturn:Episodes`.
    An episode's token budget across its turns (sampled and inserted tokens) is rollout.max_new_tokens."""
    name: str | None = Field(None, description="the environment class, 'module:Class' (cispo.env): a subclass of "
                             "cispo.env.Environment, or a Gymnasium-style text environment; imported from the working "
                             "directory, the recipe's directory and sys.path")
    tools: list[Literal["python"]] = Field(default_factory=list, description="tools the model may call with "
                                           "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>: python runs "
                                           "its 'code' argument in the code sandbox (at reward.min_isolation); its "
                                           "output is the next turn's observation")
    max_turns: int = Field(4, ge=1, description="most model turns per episode")
    max_turn_tokens: int = Field(256, ge=1, description="most tokens one model turn samples")
    tool_timeout_s: float = Field(5.0, gt=0, description="CPU seconds one tool call may run")
    tool_memory_mb: int = Field(512, ge=64, description="address-space limit of one tool call")
    max_observation_chars: int = Field(2000, ge=1, description="a tool's output is cut to this many characters")


class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline writes under "
                                                           "RUN_DIR/wandb (wandb sync uploads it later)")
    project: str = Field("cispo", description="the wandb project")


class StagesConfig(Section):
    """M1 80k: the budget grows 40K -> 48K -> ... -> 80K, moving on when generated-sequence perplexity has
    converged and the 99th-percentile length nears the window (cispo.stages.advance)."""
    windows: list[int] = Field(default_factory=list, description="response-length windows in order; the last "
                               "equals rollout.max_new_tokens; empty: one stage at the budget")
    p99_fraction: float = Field(0.95, gt=0, le=1, description="advance once p99 response length >= this x window")
    plateau_steps: int = Field(10, ge=1, description="perplexity plateau: compare the mean of the last N steps "
                               "with the N before")
    plateau_tolerance: float = Field(0.02, ge=0, description="plateaued when that relative change is below this")
    max_steps_per_stage: int = Field(0, ge=0, description="advance anyway after this many steps (0: never)")

    @field_validator("windows")
    @classmethod
    def _increasing(cls, v):
        if any(b <= a for a, b in zip(v, v[1:])) or any(w < 1 for w in v):
            raise ValueError(f"windows must be positive and increasing, got {v}")
        return v


class RoleResources(Section):
    gpus: float = Field(0, ge=0, description="GPUs per actor (0: CPU only; fractions share a GPU); a rollout "
                        "worker puts its whole model on its first GPU (no sharding over several yet)")
    cpus: float = Field(1, ge=0, description="CPUs per actor")
    node_resource: str | None = Field(None, description="a Ray custom resource; the role's actors each take one "
                                      "unit, so they run only on nodes started with it (ray start --resources)")

    def ray_options(self) -> dict:
        """`.options(**...)` for this role's Ray actors."""
        extra = {"resources": {self.node_resource: 1}} if self.node_resource else {}
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, **extra}


class ResourcesConfig(Section):
    nodes: int = Field(1, ge=1, description="machines in the cluster (what `cispo plan` checks the roles against)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs on each machine (what `cispo plan` checks against)")
    gpu_memory_gb: float = Field(80.0, gt=0, description="memory per GPU; M1 trained on H800s (80 GB)")
    rollout: RoleResources = Field(default_factory=RoleResources, description="per RolloutWorker actor")
    trainer: RoleResources = Field(default_factory=RoleResources, description="per DeepSpeed rank actor")


class Recipe(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig
    optim: OptimConfig = Field(default_factory=OptimConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    _origin: Path | None = PrivateAttr(None)  # the recipe file it was loaded from
    _overrides: dict[str, str] = PrivateAttr(default_factory=dict)  # dotted key -> value, from the command line

    def where(self, key: str) -> str:
        """Where the value of dotted `key` came from: 'command line' when an override set it (or a section
        around it, or a key inside it), else the recipe file."""
        return _where(key, self._origin, self._overrides)

    def rewards(self) -> dict:
        """Each data source's reward, built as the scoring processes will call it (rewards.registry.build):
        a user's module imported from `search_dirs()`, the code sandbox probed. Raises RecipeError, one line
        naming the reward key, its value and where it was set, for a reward that cannot load."""
        return {s.name: self.source_reward(s.name) for s in self.data.mix()}

    def source_reward(self, source: str):
        """The reward of data source `source` (see `rewards`)."""
        from rewards.registry import build

        key = f"reward.sources.{source}" if source in self.reward.sources else "reward.name"
        name = self.reward.sources.get(source, self.reward.name)
        try:
            return build(self.reward, source, self.search_dirs())
        except ValueError as exc:  # a module that does not import, a parameter it cannot fill, a weak sandbox
            why = str(exc).removeprefix(f"reward {name!r}: ")
            raise RecipeError(f"{self.where(key)}: key '{key}' = {name!r}: {why}") from None

    def search_dirs(self) -> list[str]:
        """Where a user's reward module ('module:function') is looked for, besides sys.path: the working
        directory and the recipe file's directory."""
        return [str(Path.cwd())] + ([str(self._origin.parent.resolve())] if self._origin else [])

    def uses_sandbox(self) -> bool:
        """Whether any data source is scored by running code (reward 'code'), or episodes run a python tool."""
        return "python" in self.env.tools or \
            any(self.reward.sources.get(s.name, self.reward.name) == "code" for s in self.data.mix())

    @model_validator(mode="after")
    def _consistent(self):
        # Checks across sections; files are checked where they are read, so a recipe for a cluster
        # still loads (and plans) on a laptop.
        from rewards.registry import BUILTIN

        named = {"reward.name": self.reward.name, **{f"reward.sources.{k}": v for k, v in self.reward.sources.items()}}
        for key, name in named.items():
            if name not in BUILTIN and ":" not in name:
                raise ValueError(f"{key}: unknown reward {name!r}; valid: {', '.join(BUILTIN)} or 'module:function'")
        names = [s.name for s in self.data.mix()]
        for source in self.reward.sources:
            if source not in names:
                raise ValueError(f"reward.sources: {source!r} is not a data source; sources: {', '.join(names)}")
        w = self.stages.windows
        if w and w[-1] != self.rollout.max_new_tokens:
            raise ValueError(f"stages.windows ends at {w[-1]} but rollout.max_new_tokens is "
                             f"{self.rollout.max_new_tokens}; the last window is the budget")
        return self


class RecipeError(ValueError):
    """A recipe problem, phrased as one line naming the file and the key."""


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        # A list of sections (data.sources) offers its items' keys without the index.
        inner = typing.get_args(field.annotation)[0] if typing.get_origin(field.annotation) is list else field.annotation
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            keys += _valid_keys(inner, prefix + name + ".")
    return keys


def _set_dotted(tree: dict, dotted: str, raw: str) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
        if not isinstance(tree, dict):
            raise RecipeError(f"command line: override {dotted}: {p!r} is not a section")
    tree[leaf] = yaml.safe_load(raw) if raw != "" else None


def _where(key: str, origin: Path | None, overrides: dict[str, str]) -> str:
    for k in overrides:
        if k == key or key.startswith(k + ".") or k.startswith(key + "."):
            return "command line"
    return str(origin) if origin else "the recipe"


def _explain(err: ValidationError, path: Path, overrides: dict[str, str]) -> RecipeError:
    e = err.errors()[0]
    msg = e["msg"].removeprefix("Value error, ")
    if not e["loc"]:  # a check across sections (Recipe._consistent) names its own keys
        named = [k for k in overrides if k in msg]
        return RecipeError(f"{_where(named[0], path, overrides) if named else path}: {msg}")
    if e["loc"][-1] == "[key]":  # a dict whose keys are checked (trainer.deepspeed)
        key = ".".join(str(p) for p in e["loc"][:-1])
        return RecipeError(f"{_where(key, path, overrides)}: unknown key '{key}': {msg}")
    key = ".".join(str(p) for p in e["loc"])
    where = _where(key, path, overrides)
    if e["type"] == "extra_forbidden":
        bare = ".".join(str(p) for p in e["loc"] if not isinstance(p, int))
        close = difflib.get_close_matches(bare, _valid_keys(Recipe), n=1, cutoff=0.6)
        if close:  # keep the list index the recipe used: data.sources.1.wieght -> data.sources.1.weight
            close = [".".join(key.split(".")[:-1] + close[0].split(".")[-1:])]
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return RecipeError(f"{where}: unknown key '{key}' = {e.get('input')!r}{hint}")
    if e["type"] == "missing":
        return RecipeError(f"{where}: missing required key '{key}'")
    return RecipeError(f"{where}: key '{key}' = {e.get('input')!r}: {msg}")


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
    given = {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise RecipeError(f"command line: override {item!r} is not key=value")
        _set_dotted(tree, key.strip(), value)
        given[key.strip()] = value
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as err:
        raise _explain(err, path, given) from None
    recipe._origin, recipe._overrides = path, given
    return recipe


ORIGIN_COMMENT = "# resolved from "  # the first line of a saved recipe, naming the file it was loaded from


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """The resolved recipe as YAML, headed by a comment naming its recipe file (see `saved_origin`)."""
    header = f"{ORIGIN_COMMENT}{recipe._origin}\n" if recipe._origin else ""
    Path(path).write_text(header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))


def saved_origin(path: str | Path) -> Path | None:
    """The recipe file a recipe saved by `dump_recipe` was loaded from (None if it was built in code), so
    that a run's config.yaml can be named by its recipe, e.g. in `cispo report`'s legend."""
    first = Path(path).read_text().partition("\n")[0]
    return Path(first.removeprefix(ORIGIN_COMMENT)) if first.startswith(ORIGIN_COMMENT) else None


def recipe_keys() -> str:
    """The recipe-key reference (docs/recipe-keys.md) as Markdown, generated from the field descriptions
    and the registries, so it cannot drift from the code: `python -m cispo.config > docs/recipe-keys.md`."""
    lines = ["# Recipe keys", "", "Generated by `python -m cispo.config` from the typed config (`cispo/config.py`, "
             "`rollout/config.py`, `rewards/config.py`). Every key can be set in a recipe or on the command line "
             "as `section.key=value`; `data.sources[]` keys belong to each item of the `data.sources` list.", ""]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows, sections = [], []
        for name, field in model.model_fields.items():
            listed = typing.get_origin(field.annotation) is list
            inner = typing.get_args(field.annotation)[0] if listed else field.annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                sections.append((inner, f"{prefix}{name}{'[]' if listed else ''}."))
                continue
            default = "required" if field.is_required() else f"`{field.get_default(call_default_factory=True)!r}`"
            extra = field.json_schema_extra or {}
            choices = f" Choices: {', '.join(registry(extra['choices']).names())}." if "choices" in extra else ""
            rows.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', '/')}{choices} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for inner, sub in sections:
            walk(inner, sub)

    walk(Recipe, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipe_keys(), end="")
