"""What the controller hands the rewards for each sample (no torch: rewards must not import it)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RewardInput:
    """One sampled response and the dataset row it answers.

    `prompt` is the prompt text as the dataset gave it, before any chat template or BOS; `response`
    the decoded completion; `answer` the row's answer (code tests as JSON text); `source` the data
    source's name; `completion_ids` the completion's token ids; `fields` the row's other columns,
    JSON-able (e.g. {"solution": ..., "difficulty": ...}).
    """

    prompt: str
    response: str
    answer: str
    source: str
    completion_ids: tuple[int, ...] = ()
    fields: Mapping = field(default_factory=dict)
