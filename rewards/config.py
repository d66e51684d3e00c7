"""Config section owned by `rewards`."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class FormatConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    think_in_prompt: bool = Field(False, description="the chat template opens <think>, so responses start inside it")
    pattern: str = Field(r"\\boxed\{.+\}", description="regex the answer after </think> must contain")


class RewardConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field("math", description="registered reward name (math, code, format), or 'module:function'")
    sources: dict[str, str] = Field(default_factory=dict, description="reward name per data source, overriding name")
    correct_weight: float = Field(1.0, description="weight of the correctness reward")
    format_weight: float = Field(0.0, description="weight of the M1 format reward (<think>...</think> then answer)")
    format: FormatConfig = Field(default_factory=FormatConfig)
    fraction: bool = Field(False, description="code: score the fraction of tests passed, not all-or-nothing (M1)")
    min_isolation: Literal["bwrap", "mountns", "uid", "rlimits"] = Field(
        "mountns", description="weakest code-sandbox level accepted (rewards.sandbox); below mountns a program "
        "can read the host's files and write to its /tmp, so accepting uid or rlimits is an explicit choice")
    num_workers: int = Field(2, ge=1, description="scoring processes")
    timeout_s: float = Field(10.0, gt=0, description="hard limit per scored sample; a hung scorer is killed")
