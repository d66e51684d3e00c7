"""Model families the rollout engine runs: one small adapter file each.

An adapter says which transformers model types it covers, which modules hold recurrent state, which
modules are MoE blocks (ZeRO-3 leaves), where the model does not use transformers' generic
linear-attention cache calls, a cache class that maps its calls onto the slots (rollout.states), and
where an upstream module's decode step grows with context, the forward the rollout replica runs instead.
The decode loop (rollout.engine) only ever sees a `StateCache`, so adding a family adds a file here
and a line in FAMILIES, and nothing else.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MethodType

import torch

from rollout.states import StateCache

# Layer kinds in a config's `layer_types` and the slot each gets; Nemotron-H lists its stateless
# MLP and MoE layers there too.
SLOT_KINDS = {"full_attention": "full_attention", "linear_attention": "linear_attention", "moe": "dummy",
              "mlp": "dummy"}


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # transformers `config.model_type`s this adapter covers
    state: str                    # what each recurrent slot holds, for the README and errors
    state_modules: tuple[str, ...] = ()  # class names of the layers that read and write recurrent state
    moe_blocks: tuple[str, ...] = ()     # class names of MoE blocks: ZeRO-3 leaf modules
    cache_class: type[StateCache] = StateCache
    # class name -> a forward the rollout replica's modules of that class run instead of their own, where the
    # upstream one does per decode step work that grows with context (`use_decode_forwards`)
    decode_forwards: Mapping[str, Callable] = field(default_factory=dict)

    def new_cache(self, model) -> StateCache:
        """An empty cache with one slot per layer of `model`.

        Raises ValueError naming the layer and its kind when a layer is not softmax or linear-state (see
        `layer_kinds`), or when the model's stateful modules do not match its linear layers (a variant this
        adapter does not know).
        """
        config = model.config
        kinds = layer_kinds(config)
        stateful = sum(type(m).__name__ in self.state_modules for m in model.modules())
        if stateful != kinds.count("linear_attention"):
            raise ValueError(f"{config.model_type}: {kinds.count('linear_attention')} linear_attention layers but "
                             f"{stateful} {'/'.join(self.state_modules) or 'recurrent'} modules; the {self.name} "
                             f"adapter does not know this variant")
        return self.cache_class([SLOT_KINDS[k] for k in kinds])

    def use_decode_forwards(self, model) -> None:
        """Bind `decode_forwards` to the matching modules of `model` (a generation-only replica)."""
        for module in model.modules():
            if type(module).__name__ in self.decode_forwards:
                module.forward = MethodType(self.decode_forwards[type(module).__name__], module)

    def leaf_modules(self, model) -> list[type[torch.nn.Module]]:
        """The MoE block classes in `model`: which experts run depends on the tokens, so under ZeRO-3 each
        block must gather all its experts at once (`deepspeed.utils.set_z3_leaf_modules`)."""
        return list({type(m) for m in model.modules() if type(m).__name__ in self.moe_blocks})


def _families() -> list[Family]:
    from rollout.families import dense, gated_deltanet, kda, lightning, mamba2

    return [m.FAMILY for m in (dense, lightning, gated_deltanet, kda, mamba2)]


def supported_model_types() -> list[str]:
    return [t for f in _families() for t in f.model_types]


def layer_kinds(config) -> list[str]:
    """Each layer's kind from `config` alone: "full_attention", "linear_attention", or a stateless "moe"/"mlp".

    A config without `layer_types` is all softmax, unless it sets `sliding_window` (Mistral's default): a
    window would need a ring-buffer slot that drops old positions, which no slot is. Raises ValueError naming
    the model type, the first layer of another kind (sliding-window attention, for example) and the kinds
    the engine runs.
    """
    kinds = getattr(config, "layer_types", None)
    if not kinds:
        kind = "full_attention" if getattr(config, "sliding_window", None) is None else "sliding_attention"
        kinds = [kind] * config.num_hidden_layers
    for i, kind in enumerate(kinds):
        if kind not in SLOT_KINDS:
            raise ValueError(f"{config.model_type} layer {i} is {kind!r}; the rollout engine runs "
                             f"{', '.join(SLOT_KINDS)} layers only")
    return list(kinds)


def family_of(config) -> Family:
    """The adapter for `config.model_type`, checked from the config alone, so that a model directory can be
    refused from its config.json before any weights load.

    Raises ValueError naming the model type and the supported ones when no adapter covers it, or naming the
    layer and its kind when a layer is neither softmax nor linear-state (`layer_kinds`).
    """
    for family in _families():
        if config.model_type in family.model_types:
            layer_kinds(config)
            return family
    raise ValueError(f"model type {config.model_type!r} has no rollout engine adapter; supported: "
                     f"{', '.join(supported_model_types())}")
