"""Rule-based math correctness with math-verify: the last \\boxed{} answer against the gold."""
from __future__ import annotations

import functools

from rewards.pool import ScoringPool


def strip_think(text: str) -> str:
    """The answer part: after the last </think> (a completion may start inside the thinking, its
    <think> in the prompt), and nothing from an unclosed <think> on."""
    return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, or None when it is unbalanced: falling back to an earlier
    box would grade an answer the model went on to revise (a known math-verify false positive)."""
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + len("\\boxed{"):i]
    return None


def gold_latex(answer: str) -> str:
    """Gold answers come as plain numbers, LaTeX, or GSM8K's '#### n'; math-verify wants $...$ or \\boxed{}."""
    answer = answer.split("####")[-1].strip()
    if "\\boxed" in answer or answer.startswith("$"):
        return answer
    return f"${answer.replace(',', '')}$"


def _not_false_positive(gold, pred) -> bool:
    """Re-check a match math-verify granted, against its known false positives (DESIGN §5)."""
    import sympy

    if not (isinstance(gold, sympy.Basic) and isinstance(pred, sympy.Basic)):
        return True
    eqs = [e for e in (gold, pred) if isinstance(e, sympy.Equality)]
    if len(eqs) == 2:  # equivalent equations: lhs - rhs proportional by a nonzero constant
        ratio = sympy.simplify((gold.lhs - gold.rhs) / (pred.lhs - pred.rhs))
        return bool(ratio.is_number and ratio.is_finite and ratio != 0)
    if len(eqs) == 1:  # "x = 5" may answer "5"; "x^2+3 = 0" or "5 = 5" may not answer "0" or "5"
        return isinstance(eqs[0].lhs, sympy.Symbol)
    if gold.is_number and pred.is_number:  # it rounds to 6 decimals, so 1e-7 "equals" 2e-7
        try:
            a, b = abs(float(gold)), abs(float(pred))
        except TypeError:  # complex
            return True
        if max(a, b) < 1e-3:
            return abs(float(gold) - float(pred)) <= 1e-4 * max(a, b)
    return True


def verify_boxed(response: str, answer: str) -> float:
    """In-process grading; call through `score` (or a ScoringPool) so a hang cannot stall the caller."""
    from math_verify import parse, verify

    pred = last_boxed(strip_think(response))
    if not pred:
        return 0.0
    gold, got = parse(gold_latex(answer)), parse(f"\\boxed{{{pred}}}")
    if not gold or not got or not verify(gold, got):
        return 0.0
    return 1.0 if _not_false_positive(gold[0], got[0]) else 0.0


@functools.cache
def _pool() -> ScoringPool:
    return ScoringPool(num_workers=1, timeout_s=10.0)


def score(response: str, answer: str) -> float:
    """1.0 if the response's last \\boxed{} matches `answer`, else 0.0; math-verify runs in a worker process."""
    return _pool().map(verify_boxed, [(response, answer)])[0].score
