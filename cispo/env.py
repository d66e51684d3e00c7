"""Environments a multi-turn episode plays against (cispo.multiturn), named in a recipe as `env.name:
module:Class` and imported like a user's reward: from the working directory, the recipe's directory and
sys.path.

Our interface is two methods on a subclass of `Environment`, one instance per episode:
- `reset(task) -> messages`: the conversation's first messages (chat dicts, or a string: one user turn);
- `step(text) -> Step(observation, reward, done)`: the model's turn as text in; the next user turn's
  text (None: no more), the reward of this step, and whether the episode is over.
The episode's reward is the sum of its steps' rewards.

A class that does not subclass `Environment` but has `reset` and `step` is taken as Gymnasium-style and
adapted (`GymText`): `reset(seed=, options=) -> (observation, info)`, `step(action) -> (observation,
reward, terminated, truncated, info)`, observations and actions being text.

A subclass of OpenEnv's `Environment` (openenv-core, the `openenv` extra) is adapted too (`OpenEnvText`): its
typed pydantic actions and observations are read and written as text, one field each (see the class), and
it runs in this process: no container, no HTTP server.
"""
from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

from rewards.plugins import import_function


@dataclass(frozen=True)
class Task:
    """One prompt of the data, as an environment resets to it: its text, its answer (what a reward
    compares against), its data source's name and the row's other columns."""
    prompt: str
    answer: str = ""
    source: str = ""
    fields: dict = field(default_factory=dict, hash=False)


class Step(NamedTuple):
    observation: str | None  # the next user turn's text; None when there is none
    reward: float
    done: bool


class Environment:
    """Subclass and write `reset` and `step` (see the module docstring). One instance plays one episode;
    the class is built with no arguments."""

    def reset(self, task: Task) -> list[dict] | str:
        raise NotImplementedError

    def step(self, text: str) -> Step:
        raise NotImplementedError


class EnvError(Exception):
    """An environment broke its interface (a wrong return shape): one line naming the method and the shape."""


class GymText(Environment):
    """A Gymnasium-style text environment as ours: `reset` gets the task's columns as `options`
    (prompt, answer, source and the row's fields) and a seed; an episode ends when the environment says
    terminated or truncated."""

    def __init__(self, env, seed: int):
        self.env, self.seed = env, seed

    def reset(self, task: Task) -> list[dict]:
        out = self.env.reset(seed=self.seed, options={"prompt": task.prompt, "answer": task.answer,
                                                      "source": task.source, **task.fields})
        if not (isinstance(out, tuple) and len(out) == 2):
            raise EnvError(f"reset returned {_shape(out)}; a Gymnasium-style reset returns (observation, info)")
        return [{"role": "user", "content": _text(out[0], "reset")}]

    def step(self, text: str) -> Step:
        out = self.env.step(text)
        if not (isinstance(out, tuple) and len(out) == 5):
            raise EnvError(f"step returned {_shape(out)}; a Gymnasium-style step returns (observation, reward, "
                           f"terminated, truncated, info)")
        obs, reward, terminated, truncated, _ = out
        done = bool(terminated or truncated)
        return Step(None if done else _text(obs, "step"), float(reward), done)


class OpenEnvText(Environment):
    """An OpenEnv environment (a subclass of `openenv.core.Environment`, written as its documentation shows:
    `reset(seed=, episode_id=, **kwargs) -> Observation`, `step(action) -> Observation` carrying `reward` and
    `done`) as ours.

    - reset gets a seed, an episode id and the task's columns (prompt, answer, source, the row's fields) as
      keyword arguments, those its signature names (all, when it takes **kwargs);
    - the model's turn becomes the action class's one required field (the class `step` annotates, or the
      environment's first generic argument): `Action(answer=text)` for `answer: str`;
    - an observation's text is its first string field, in declaration order, that holds a string; the
      step's reward is `observation.reward` (None: 0).
    EnvError, one line, for an observation with no text, or an action class it cannot fill from text."""

    def __init__(self, env, seed: int):
        self.env, self.seed = env, seed
        self.action = _action_field(type(env))

    def reset(self, task: Task) -> list[dict]:
        columns = {"prompt": task.prompt, "answer": task.answer, "source": task.source, **task.fields}
        params = inspect.signature(self.env.reset).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            columns = {k: v for k, v in columns.items() if k in params}
        obs = self.env.reset(seed=self.seed, episode_id=f"cispo-{self.seed}", **columns)
        return [{"role": "user", "content": _observed_text(obs, "reset")}]

    def step(self, text: str) -> Step:
        cls, name = self.action
        obs = _observation(self.env.step(cls(**{name: text})), "step")
        return Step(None if obs.done else _observed_text(obs, "step"), float(obs.reward or 0.0), bool(obs.done))


def _openenv():
    """openenv.core's types, imported already by whoever subclassed its Environment (None otherwise)."""
    return sys.modules.get("openenv.core.env_server.types")


def _is_openenv(cls: type) -> bool:
    interfaces = sys.modules.get("openenv.core.env_server.interfaces")
    return interfaces is not None and issubclass(cls, interfaces.Environment)


def _action_field(cls: type) -> tuple[type, str]:
    """The action class an OpenEnv environment's `step` takes, and its one required field."""
    action = typing.get_type_hints(cls.step).get("action")
    if not isinstance(action, type):  # unannotated: Environment[Action, Observation, State]'s first argument
        args = [typing.get_args(b) for b in getattr(cls, "__orig_bases__", ()) if typing.get_args(b)]
        action = args[0][0] if args and isinstance(args[0][0], type) else None
    if action is None or not issubclass(action, _openenv().Action):
        raise EnvError(f"{cls.__name__}.step takes no annotated Action subclass: annotate step(self, action: MyAction) "
                       f"or subclass Environment[MyAction, MyObservation, MyState]")
    required = [n for n, f in action.model_fields.items() if f.is_required()]
    if len(required) != 1:
        raise EnvError(f"{action.__name__} has required fields {required}; a text action has exactly one, which "
                       f"the model's turn fills")
    return action, required[0]


def _observation(obs, method: str):
    if not isinstance(obs, _openenv().Observation):
        raise EnvError(f"{method} returned {_shape(obs)}; an OpenEnv environment returns an Observation")
    return obs


def _observed_text(obs, method: str) -> str:
    obs = _observation(obs, method)
    text = next((v for n in type(obs).model_fields if isinstance(v := getattr(obs, n), str)), None)
    if text is None:
        raise EnvError(f"{method} returned a {type(obs).__name__} with no string field set; the model reads an "
                       f"observation's first string field")
    return text


def _shape(value) -> str:
    return f"a tuple of {len(value)}" if isinstance(value, tuple) else f"a {type(value).__name__}"


def _text(obs, method: str) -> str:
    if not isinstance(obs, str):
        raise EnvError(f"{method} returned a {type(obs).__name__} observation; a text environment's is a str")
    return obs


def messages(first, name: str) -> list[dict]:
    """`reset`'s result as chat messages: a string is one user turn. EnvError for anything else."""
    if isinstance(first, str):
        return [{"role": "user", "content": first}]
    if isinstance(first, list) and first and all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                  for m in first):
        return [dict(m) for m in first]
    raise EnvError(f"{name}.reset returned {_shape(first)}; expected a string or a non-empty list of "
                   f"{{'role', 'content'}} messages")


def step_result(out, name: str) -> Step:
    """`step`'s result as a Step (a 3-tuple is accepted). EnvError for anything else."""
    if isinstance(out, tuple) and len(out) == 3:
        obs, reward, done = out
        if (obs is None or isinstance(obs, str)) and isinstance(reward, (int, float)):
            return Step(obs, float(reward), bool(done))
    raise EnvError(f"{name}.step returned {_shape(out)}; expected Step(observation: str | None, reward, done)")


def load_env(name: str, search=()):
    """The environment class `name` ('module:Class') names, imported by rewards.plugins.import_function
    from `search` and sys.path; `make(seed)` builds one instance of it as our interface (a Gymnasium-style
    class adapted by GymText). Raises ValueError, one line starting "env {name!r}: ", when it cannot be
    imported or is not a class with reset and step, or is an OpenEnv environment whose actions are not text."""
    cls = import_function(name, search, kind="env")
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ValueError(f"env {name!r}: expected a class with reset and step methods, got {_shape(cls)}")
    if issubclass(cls, Environment):
        return lambda seed: cls()
    if _is_openenv(cls):
        try:
            _action_field(cls)
        except EnvError as exc:
            raise ValueError(f"env {name!r}: {exc}") from None
        return lambda seed: OpenEnvText(cls(), seed)
    return lambda seed: GymText(cls(), seed)
