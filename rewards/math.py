"""Rule-based math correctness with math-verify: the response's last answer against the gold."""
from __future__ import annotations

import functools
import re

from rewards.pool import ScoringPool
from rewards.types import RewardInput

# \boxed{..}, \boxed {..}, \boxed 5, \fbox{..}, \framebox{..}; `(?![A-Za-z])` so \boxedsomething is another macro.
_BOX = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")
_TAG = re.compile(r"<answer>")  # R1-style <answer>...</answer>, common in GRPO prompts
# "Final answer: 5", "**Final Answer:** 5", Minerva's "The final answer is $5$. I hope it is correct.", and
# DAPO-Math-17k's "Answer: $5$" line (its prompt asks for it as the last line; EasyR1 PR #382), also bold.
_FINAL = re.compile(r"final answer(?:\*\*)?(?:\s+is\b\s*:?|\s*:)[\s*]*|^[ \t>#*]*answer(?:\*\*)?\s*:[\s*]*",
                    re.IGNORECASE | re.MULTILINE)
_MATH = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# A number whose only separators are thousands separators: 115,000, 10,\!000, 1{,}000, 1\,000.
_GROUPED = re.compile(r"[-+]?[1-9]\d{0,2}(?:(?:,\\!|\{,\}|,|\\,)\d{3})+(?:\.\d+)?")


def strip_think(text: str) -> str:
    """The answer part: after the last </think> (a completion may start inside the thinking, its
    <think> in the prompt), and nothing from an unclosed <think> on."""
    return text.rsplit("</think>", 1)[-1].split("<think>", 1)[0]


def last_boxed(text: str) -> str | None:
    """Content of the last answer marker in `text`, in any common spelling: `\\boxed{..}` (also with a
    space before the brace), `\\fbox{..}`, `\\framebox{..}`, a brace-less `\\boxed 5` (to the end of its
    math or line, as the MATH reference grader reads it), `<answer>..</answer>`, or a stated "final
    answer: .." / "the final answer is .." / a line "Answer: .." (DAPO-Math's) (its math, else its
    sentence; one that states nothing answer-like, as in "the final answer is correct", is no marker). None when the last marker is
    empty, unbalanced or unclosed: falling back to an earlier marker would grade an answer the model
    went on to revise (a known math-verify false positive)."""
    marks = [(m.end(), _boxed) for m in _BOX.finditer(text)] + [(m.end(), _tagged) for m in _TAG.finditer(text)]
    marks += [(m.end(), _stated) for m in _FINAL.finditer(text) if _stated(text[m.end():])]
    if not marks:
        return None
    end, content = max(marks, key=lambda mark: mark[0])
    return content(text[end:])


def _boxed(rest: str) -> str | None:
    body = rest.lstrip()
    if not body.startswith("{"):  # \boxed 5: to the end of the math ($, \], \)) or of the line
        return re.split(r"\$|\\\]|\\\)|\n", body, maxsplit=1)[0].strip().rstrip(".").strip() or None
    depth = 0
    for i, char in enumerate(body):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return body[1:i].strip() or None
    return None


def _tagged(rest: str) -> str | None:
    content, closed, _ = rest.partition("</answer>")
    return content.strip() or None if closed else None


def _stated(rest: str) -> str | None:
    math = _MATH.match(rest)
    content = next(g for g in math.groups() if g) if math else re.split(r"\n|\.(?:\s|$)", rest, maxsplit=1)[0]
    content = content.strip().strip("*").strip()
    return content if re.search(r"\d|\\|^\(?[A-Ea-e]\)?$", content) else None


def _ungroup(number: str) -> str:
    """`number` without thousands separators when it is one grouped number (115,000), else as it is:
    a comma in `0,1`, `(1,2)` or `[0,1)` separates elements, and math-verify reads it so."""
    return re.sub(r"\\!|\{,\}|,|\\,", "", number) if _GROUPED.fullmatch(number.strip()) else number


def gold_latex(answer: str) -> str:
    """Gold answers come as plain text, LaTeX, or GSM8K's '#### n'; math-verify wants $...$ or \\boxed{}.
    Only thousands separators are removed (`115,000`); structured answers (tuples, intervals, sets,
    lists) keep their commas, so they compare as structures."""
    answer = answer.split("####")[-1].strip()
    if answer.startswith(("$", "\\boxed", "\\(", "\\[")):
        return answer
    return f"${_ungroup(answer)}$"


def _not_false_positive(gold, pred) -> bool:
    """Re-check a match math-verify granted, against its known false positives (docs/notes.md#math-verify)."""
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
    """In-process grading of the last answer marker (see `last_boxed`) outside the thinking; call
    through `score` (or a ScoringPool) so that a hang cannot stall the caller."""
    from math_verify import parse, verify

    pred = last_boxed(strip_think(response))
    if not pred:
        return 0.0
    gold, got = parse(gold_latex(answer)), parse(f"\\boxed{{{_ungroup(pred)}}}")
    if not gold or not got or not verify(gold, got):
        return 0.0
    return 1.0 if _not_false_positive(gold[0], got[0]) else 0.0


@functools.cache
def _pool() -> ScoringPool:
    return ScoringPool(num_workers=1, timeout_s=10.0)


def score(response: str, answer: str) -> float:
    """1.0 if the response's last answer matches `answer`, else 0.0; math-verify runs in a worker
    process. Raises RuntimeError when grading failed (timed out or crashed) rather than scoring it 0."""
    result = _pool().map(verify_boxed, [RewardInput(prompt="", response=response, answer=answer, source="math")])[0]
    if result.status != "ok":
        raise RuntimeError(f"math grading {result.status}: {result.error}")
    return result.score
