"""Reward functions as users already wrote them, called by parameter name.

The pool calls every reward as `reward(inputs: list[RewardInput]) -> list` (one score per input);
`adapt(fn)` builds that call from `fn`'s parameter names, so these shapes run unchanged:

- ours, per sample: `fn(response, answer) -> float`; batched: `@batched fn(responses, answers) ->
  list[float]`; either as `async def`. Parameters named `prompt`, `source`, `completion_ids` or
  `fields` get those (lists when batched); positional parameters of other names get, in order,
  the response and the answer (whichever no parameter names), so `fn(text, gold)` works too.
- verl: `compute_score(data_source, solution_str, ground_truth, extra_info=None)`, by name, so
  keyword-only parameters work: `data_source` is the data source's name, `extra_info` the row's other
  columns (or the row's own `extra_info` column, as in verl's parquet files). A dict result's
  "score" is the score.
- TRL: any function with a `completions` parameter, called once per batch with keyword lists
  `prompts`, `completions`, `completion_ids`, `trainer_state=None` (there is no TRL trainer) and
  every dataset column: `answer` and the row's fields. Another named parameter is a column; a batch
  without it is an error naming it. As in TRL, None means "no score", which the pool counts as an error.

A parameter none of these fills is a load-time ValueError naming it. Adapted rewards are objects,
not closures, so the pool can pickle them to its worker processes; one loaded by name (`load`)
pickles as that name and is loaded again there, search directories included.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import sys

from rewards.types import RewardInput

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def batched(fn):
    """Mark `fn(responses, answers) -> list[float]` as batched: the pool calls it once per worker."""
    fn.batched = True
    return fn


def call_reward(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, awaited when the reward is async (a fresh event loop: workers have none)."""
    out = fn(*args, **kwargs)
    if inspect.isawaitable(out):
        async def wait():
            return await out
        out = asyncio.run(wait())
    return out


def _extra_info(x: RewardInput):
    own = x.fields.get("extra_info")
    return dict(own) if isinstance(own, dict) else dict(x.fields)


# Per-sample values a parameter of that name gets: ours, then verl's names.
VALUES = {
    "response": lambda x: x.response, "answer": lambda x: x.answer, "prompt": lambda x: x.prompt,
    "source": lambda x: x.source, "completion_ids": lambda x: list(x.completion_ids),
    "fields": lambda x: dict(x.fields),
    "solution_str": lambda x: x.response, "ground_truth": lambda x: x.answer,
    "data_source": lambda x: x.source, "extra_info": _extra_info,
}
_SAME = {"solution_str": "response", "ground_truth": "answer"}
_BY_POSITION = ("response", "answer")  # what positional parameters of other names get, in order, unless named
TRL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")


def _describe(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", repr(fn))


class Reward:
    """`fn` adapted to the pool's call: `reward(inputs) -> list`, one raw score per RewardInput.
    `batched`: the pool may pass many inputs at once (else one, each with its own timeout)."""

    def __init__(self, fn, name: str | None = None, search: tuple[str, ...] = ()):
        self.fn, self.name, self.search = fn, name, tuple(search)
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"reward {_describe(fn)}: its parameters cannot be read ({exc})") from None
        self.trl = any(p.name == "completions" for p in params)
        self.batched = self.trl or getattr(fn, "batched", False)
        self.kwargs = any(p.kind is p.VAR_KEYWORD for p in params)
        self.optional = {p.name for p in params if p.default is not p.empty}
        self.plan = self._plan(params)  # [(parameter, value name, positional?)]

    def _plan(self, params) -> list[tuple[str, str, bool]]:
        named = {_SAME.get(p.name, p.name) for p in params}
        plan, by_position = [], [v for v in _BY_POSITION if v not in named]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            positional = p.kind is p.POSITIONAL_ONLY
            if self.trl:
                if positional:
                    raise ValueError(f"reward {_describe(self.fn)}: parameter {p.name!r} is positional-only; "
                                     f"TRL-style rewards are called by keyword")
                plan.append((p.name, p.name, False))  # a TRL name or a dataset column, checked per batch
            elif p.name in VALUES:
                plan.append((p.name, p.name, positional))
            elif p.kind in _POSITIONAL and by_position and p.default is p.empty:
                plan.append((p.name, by_position.pop(0), positional))
            elif p.default is p.empty:
                raise ValueError(f"reward {_describe(self.fn)}: cannot fill parameter {p.name!r}; a reward takes "
                                 f"the response and the answer, and by name {', '.join(VALUES)}, or TRL's "
                                 f"{', '.join(TRL_ARGS)} with dataset columns")
        return plan

    def __call__(self, inputs: list[RewardInput]) -> list:
        if self.trl:
            return list(self._trl(inputs))
        if self.batched:
            return [_unwrap(s) for s in self._call(lambda key: [VALUES[key](x) for x in inputs])]
        return [_unwrap(self._call(lambda key: VALUES[key](x))) for x in inputs]

    def _call(self, value):
        args = [value(key) for _, key, positional in self.plan if positional]
        kwargs = {name: value(key) for name, key, positional in self.plan if not positional}
        return call_reward(self.fn, *args, **kwargs)

    def _trl(self, inputs: list[RewardInput]):
        columns = {"answer": [x.answer for x in inputs]}
        for key in dict.fromkeys(k for x in inputs for k in x.fields):
            columns.setdefault(key, [x.fields.get(key) for x in inputs])
        given = {**columns, "prompts": [x.prompt for x in inputs], "completions": [x.response for x in inputs],
                 "completion_ids": [list(x.completion_ids) for x in inputs], "trainer_state": None}
        for name, _, _ in self.plan:
            if name not in given and name not in self.optional:
                raise ValueError(f"reward parameter {name!r} is not a dataset column of source "
                                 f"{inputs[0].source!r}; columns: {', '.join(columns)}")
        if not self.kwargs:
            given = {name: given[name] for name, _, _ in self.plan if name in given}
        return call_reward(self.fn, **given)

    def __reduce_ex__(self, protocol):
        if self.name:  # a user's function: loaded again in the worker, from the same directories
            return load, (self.name, self.search)
        return super().__reduce_ex__(protocol)


def _unwrap(score):
    return score["score"] if isinstance(score, dict) and "score" in score else score


def adapt(fn) -> Reward:
    """`fn` as the pool calls it (see the module docstring); a Reward comes back as it is.
    Raises ValueError naming a parameter that cannot be filled."""
    return fn if isinstance(fn, Reward) else Reward(fn)


def import_function(name: str, search=(), kind: str = "reward"):
    """The callable `name` ('module:function') names. The directories in `search` go to the front of
    sys.path first, as PYTHONPATH would put them, so the module (and its own imports) resolve from the
    working directory or beside a recipe. Raises ValueError, one line starting "{kind} {name!r}: ",
    when it cannot be imported."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ValueError(f"{kind} {name!r}: expected 'module:function'")
    search = tuple(str(d) for d in search)
    for d in reversed(search):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except AttributeError:
        raise ValueError(f"{kind} {name!r}: module {module!r} has no {attr!r}") from None
    except Exception as exc:  # ImportError, or whatever the module raised while importing
        where = f" (searched {', '.join(search)} and sys.path)" if isinstance(exc, ModuleNotFoundError) else ""
        raise ValueError(f"{kind} {name!r}: module {module!r} cannot be imported: "
                         f"{type(exc).__name__}: {exc}{where}") from None
    if not callable(fn):
        raise ValueError(f"{kind} {name!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def load(name: str, search=()) -> Reward:
    """The function `name` ('module:function') adapted, imported by `import_function` from `search`
    and sys.path. Raises ValueError, one line, when it cannot be loaded."""
    search = tuple(str(d) for d in search)
    return Reward(import_function(name, search), name, search)
