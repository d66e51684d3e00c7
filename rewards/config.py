"""Config section owned by `rewards`."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("math", description="registered reward name, or 'module:function'")
    num_workers: int = Field(2, ge=1, description="scoring processes")
    timeout_s: float = Field(10.0, gt=0, description="hard limit per scored sample; a hung scorer is killed")
