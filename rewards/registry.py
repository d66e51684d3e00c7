"""Reward functions by name: built-in names or a user's 'module:function'."""
from __future__ import annotations

import importlib

from rewards.math import verify_boxed

BUILTIN = {"math": verify_boxed}


def resolve(name: str):
    """A per-sample reward `fn(response, answer) -> float` for `name`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown reward {name!r}; valid: {', '.join(BUILTIN)} or 'module:function'")
    module, _, attr = name.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {name!r} cannot be loaded: {exc}") from None
