"""M1-style format reward: thinking inside <think>…</think>, then an answer of the expected shape."""
from __future__ import annotations

import re


def score(response: str, answer=None, *, think_in_prompt: bool = False, pattern: str = r"\\boxed\{.+\}") -> float:
    """1.0 when `response` is one non-empty <think>…</think> block followed by an answer in which
    `pattern` (a regex) occurs, else 0.0. With `think_in_prompt` the chat template already opened
    the <think>, so the response starts inside it. `answer` is unused: any reward takes (response, answer)."""
    opening = "" if think_in_prompt else r"\s*<think>"
    m = re.fullmatch(opening + r"(?P<thought>.*?)</think>(?P<answer>.*)", response, re.DOTALL)
    if not m or not m["thought"].strip() or "<think>" in m["thought"] or "think>" in m["answer"]:
        return 0.0
    return 1.0 if re.search(pattern, m["answer"], re.DOTALL) else 0.0
