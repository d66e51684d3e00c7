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
"""
from __future__ import annotations

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
    imported or is not a class with reset and step."""
    cls = import_function(name, search, kind="env")
    if not isinstance(cls, type) or not all(callable(getattr(cls, m, None)) for m in ("reset", "step")):
        raise ValueError(f"env {name!r}: expected a class with reset and step methods, got {_shape(cls)}")
    if issubclass(cls, Environment):
        return lambda seed: cls()
    return lambda seed: GymText(cls(), seed)
