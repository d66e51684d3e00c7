"""One typed config tree; each package owns its section, YAML recipes mirror it key for key."""
from __future__ import annotations

import difflib
import typing
import warnings
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from cispo import loss as losses
from cispo.advantages import ESTIMATORS
from cispo.section import RecipeError, Section, choices
from cispo.sections import (AlgorithmConfig, DataConfig, EnvConfig, EvalConfig, OptimConfig, ResourcesConfig,
                            RunConfig, SFTConfig, StagesConfig, TrainerConfig, WandbConfig)
from rewards.config import RewardConfig
from rewards.plugins import import_function
from rollout.config import ROUTING_REPLAY_TYPES, ModelConfig, RolloutConfig, model_type, vllm_refuses


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

    def loss(self):
        """The loss function `algorithm.name` names, imported as each trainer rank imports it (cispo.loss.resolve),
        from `search_dirs()`. Raises RecipeError, one line naming the key, its value and where it was set."""
        return self._load("algorithm.name", self.algorithm.name, "loss", losses.resolve)

    def rollout_function(self):
        """The rollout function `rollout.function` names ('module:fn', rollout.trajectory.RolloutFunction, or a
        class), imported from `search_dirs()` and sys.path. Raises RecipeError, one line naming the key, its
        value and where it was set."""
        return self._load("rollout.function", self.rollout.function, "rollout function",
                          lambda name, search: import_function(name, search, kind="rollout function"))

    def _load(self, key: str, name: str, kind: str, load):
        try:
            return load(name, self.search_dirs())
        except ValueError as exc:
            why = str(exc).removeprefix(f"{kind} {name!r}: ")
            raise RecipeError(f"{self.where(key)}: key '{key}' = {name!r}: {why}") from None

    def search_dirs(self) -> list[str]:
        """Where a user's reward or loss module ('module:function') is looked for, besides sys.path: the working
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
        per_row = any(s.format == "verl" or "source" in s.columns for s in self.data.mix())  # named in the data
        for source in self.reward.sources:
            if source not in names and not per_row:
                raise ValueError(f"reward.sources: {source!r} is not a data source; sources: {', '.join(names)}")
        # A group-relative advantage of G identical samples is 0 for every response: nothing would ever
        # train, or dynamic sampling would drop every group (rllm PR #917).
        r = self.rollout
        alike = ("rollout.n_samples=1 gives one sample per prompt" if r.n_samples < 2 else
                 "rollout.temperature=0 samples greedily" if r.temperature == 0 else
                 "rollout.top_k=1 samples greedily" if r.top_k == 1 else None)
        if alike and ESTIMATORS[self.algorithm.advantage].meta["group_relative"]:
            raise ValueError(f"{alike}, so algorithm.advantage={self.algorithm.advantage} (relative to the other "
                             f"samples of the prompt) is 0 for every response; sample at least 2, differently")
        if self.algorithm.routing_replay and r.engine != "cispo":
            raise ValueError(f"algorithm.routing_replay needs the experts each token was routed to, which only "
                             f"rollout.engine: cispo records, not {r.engine}")
        if self.algorithm.routing_replay and model_type(self.model) not in (None, *ROUTING_REPLAY_TYPES):
            raise ValueError(f"algorithm.routing_replay does not cover model type {model_type(self.model)!r}; it "
                             f"covers {', '.join(ROUTING_REPLAY_TYPES)}")
        if self.rollout.engine == "vllm" and (why := vllm_refuses(self.model)):
            raise ValueError(f"rollout.engine=vllm: vLLM does not serve the model, {why}; use rollout.engine: cispo")
        w = self.stages.windows
        if w and w[-1] != self.rollout.max_new_tokens:
            raise ValueError(f"stages.windows ends at {w[-1]} but rollout.max_new_tokens is "
                             f"{self.rollout.max_new_tokens}; the last window is the budget")
        if self.resources.colocate:
            clash = ("rollout.engine=vllm: vLLM initializes torch.distributed for itself, which DeepSpeed already "
                     "holds in a trainer rank" if r.engine == "vllm" else
                     f"rollout.num_workers={r.num_workers} replicas need as many trainer ranks, not "
                     f"trainer.num_ranks={self.trainer.num_ranks}" if r.num_workers > self.trainer.num_ranks else
                     "resources.rollout places rollout workers of their own, and a replica takes its rank's place"
                     if self.resources.rollout != type(self.resources.rollout)() else
                     # The collector's thread and the controller's call the same ranks, in no fixed order: a rank
                     # generating the next step would hold the others in a ZeRO collective (10 minutes' timeout).
                     f"rollout.overlap=true on trainer.num_ranks={self.trainer.num_ranks}: ranks would wait in "
                     f"training's collectives while another rank generates" if r.overlap and self.trainer.num_ranks > 1
                     else None)
            if clash:
                raise ValueError(f"resources.colocate=true puts the rollout replicas in trainer ranks; {clash}; "
                                 f"set resources.colocate=false")
            if r.overlap:  # the same rows either way (versions, not timing, decide them), but no time saved
                warnings.warn("rollout.overlap with resources.colocate: the next step's rollout and this step's "
                              "training take turns in the one trainer rank, so nothing overlaps; set "
                              "resources.colocate=false for a rollout worker of its own", stacklevel=2)
        if r.partial_tokens and r.function != type(r).model_fields["function"].default:
            raise ValueError(f"rollout.partial_tokens needs the default rollout.function (one engine call per "
                             f"sample, to pause and continue), not {r.function!r}")
        if r.overlap or r.partial_tokens:
            # A group admitted at step s is decoded at steps s .. s+C-1 (C = ceil(budget / partial_tokens)),
            # trained at the step it finishes, from weights `overlap` steps behind: its oldest token is then
            # C-1+overlap versions old. Admitting only what meets the bound means refusing what cannot.
            chunks = -(-r.max_new_tokens // r.partial_tokens) if r.partial_tokens else 1
            if chunks - 1 + r.overlap > r.max_staleness:
                raise ValueError(f"rollout.max_staleness={r.max_staleness} admits no response: with overlap="
                                 f"{str(r.overlap).lower()} and partial_tokens={r.partial_tokens}, a response of "
                                 f"max_new_tokens={r.max_new_tokens} may train {chunks - 1 + r.overlap} versions old")
            if chunks - 1 + r.overlap >= 2 and self.algorithm.name == "cispo":
                # Measured, README "Asynchronous rollouts at staleness 2": the capped weight lets a negative
                # advantage keep lowering a token (<eos>) the current policy already lowered; Eq. 7 masks it.
                warnings.warn(f"rollout: tokens may train {chunks - 1 + r.overlap} versions old under M1's unmasked "
                              "CISPO, which at staleness 2 fell behind synchronous training on tiny-countdown in 2 of 3 "
                              "seeds (README, issue 19); M1's masked loss (algorithm.name=cispo_masked "
                              "algorithm.eps_low=0.2) kept up", stacklevel=2)
        return self


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
             "`cispo/sections.py`, `cispo/loss.py`, `rollout/config.py`, `rewards/config.py`). Every key can be set in a recipe or on the command line "
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
            chosen = choices(field)
            options = f" Choices: {', '.join(chosen[0])}{' or module:function' if chosen[1] else ''}." if chosen else ""
            rows.append(f"| `{prefix}{name}` | {default} | {(field.description or '').replace('|', '/')}{options} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.')}`", "", "| key | default | meaning |", "|---|---|---|", *rows, ""])
        for inner, sub in sections:
            walk(inner, sub)

    walk(Recipe, "")
    return "\n".join(lines)


if __name__ == "__main__":
    print(recipe_keys(), end="")