"""The base of every config section, and the recipe error. A leaf module: the registries' own modules
(cispo.loss, cispo.data, ...) import it, and the sections (cispo.sections) import those registries
directly, so no module imports another by name at run time."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cispo.registry import Registry

# A choice field's registry, by the registry's kind (json_schema_extra holds only plain values).
CHOICES: dict[str, Registry] = {}


class RecipeError(ValueError):
    """A recipe problem, phrased as one line naming the file and the key."""


def choice(registry: Registry, description: str, default=..., plugin: bool = False, **field):
    """A field whose value must be a name registered in `registry` (or, with `plugin`, a user's
    'module:function', loaded where it is used); the valid names are those registered, so adding a
    choice never touches the config. `field` goes to pydantic's Field."""
    CHOICES[registry.kind] = registry
    extra = {"choices": registry.kind, "plugin": plugin}
    return Field(default, description=description, json_schema_extra=extra, **field)


def choices(field) -> tuple[Registry, bool] | None:
    """The registry a field's value is chosen from and whether 'module:function' is allowed (see
    `choice`), or None."""
    extra = field.json_schema_extra or {}
    return (CHOICES[extra["choices"]], extra["plugin"]) if "choices" in extra else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*")
    @classmethod
    def _registered(cls, v, info):
        chosen = choices(cls.model_fields[info.field_name])
        if chosen is None or v is None or v in chosen[0]:
            return v
        registry, plugin = chosen
        if plugin and ":" in v:
            return v  # a user's function: imported, with a one-line error, where it is used
        user = " or 'module:function'" if plugin else ""
        raise ValueError(f"unknown {registry.kind} {v!r}; valid: {', '.join(registry)}{user}")
