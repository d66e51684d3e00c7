"""Rule-based math correctness with math-verify: the last \\boxed{} answer against the gold."""
from __future__ import annotations

import functools
import re

from rewards.pool import ScoringPool

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def last_boxed(text: str) -> str | None:
    """Content of the last well-formed \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for i in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start + len("\\boxed{"):i]
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try the previous box
    return None


def gold_latex(answer: str) -> str:
    """Gold answers come as plain numbers, LaTeX, or GSM8K's '#### n'; math-verify wants $...$ or \\boxed{}."""
    answer = answer.split("####")[-1].strip()
    if "\\boxed" in answer or answer.startswith("$"):
        return answer
    return f"${answer.replace(',', '')}$"


def verify_boxed(response: str, answer: str) -> float:
    """In-process grading; call through `score` (or a ScoringPool) so a hang cannot stall the caller."""
    from math_verify import parse, verify

    pred = last_boxed(_THINK.sub("", response))
    if pred is None:
        return 0.0
    gold = parse(gold_latex(answer))
    return 1.0 if gold and verify(gold, parse(f"\\boxed{{{pred}}}")) else 0.0


@functools.cache
def _pool() -> ScoringPool:
    return ScoringPool(num_workers=1, timeout_s=10.0)


def score(response: str, answer: str) -> float:
    """1.0 if the response's last \\boxed{} matches `answer`, else 0.0; math-verify runs in a worker process."""
    return _pool().map(verify_boxed, [(response, answer)])[0].score
