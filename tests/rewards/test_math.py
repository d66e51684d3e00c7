import json
from fractions import Fraction

import pytest

from pathlib import Path
from rewards.math import gold_latex, last_boxed, score, strip_think, verify_boxed

REPO = Path(__file__).resolve().parents[2]


def gsm8k_golds() -> list[str]:
    rows = [json.loads(line) for line in (REPO / "data/gsm8k/test.jsonl").read_text().splitlines()]
    return [r["answer"] for r in rows]


def test_every_gsm8k_gold_verifies_against_itself_and_not_against_gold_plus_one():
    wrong_self, right_plus_one = [], []
    for answer in gsm8k_golds():
        gold = answer.split("####")[-1].strip().replace(",", "")
        plus_one = str(Fraction(gold) + 1)
        if verify_boxed(f"so the answer is \\boxed{{{gold}}}", answer) != 1.0:
            wrong_self.append(gold)
        if verify_boxed(f"\\boxed{{{plus_one}}}", answer) != 0.0:
            right_plus_one.append(gold)
    assert not wrong_self and not right_plus_one


@pytest.mark.parametrize("response, answer, expected", [
    ("\\boxed{0.0000002}", "0.0000001", 0.0),   # math-verify rounds to 6 decimals: tiny magnitudes
    ("\\boxed{0.0000001}", "0.0000001", 1.0),
    ("\\boxed{x^2+3=0}", "0", 0.0),             # any "...=0" equation matched gold 0
    ("\\boxed{5=5}", "5", 0.0),
    ("\\boxed{x=5}", "5", 1.0),                 # a variable's value still answers
    ("\\boxed{y=2x}", "y-2x=0", 1.0),           # equivalent equations
    ("\\boxed{x+y=0}", "2x+2y=0", 1.0),
    ("\\boxed{x=2}", "x^2=4", 0.0),
    ("\\boxed{5} no wait, \\boxed{6", "5", 0.0),  # no fallback to an earlier box
    ("\\boxed{5} then \\boxed{6}", "5", 0.0),   # the last box counts
    ("<think>\\boxed{5}</think> \\boxed{6}", "5", 0.0),  # thinking is not graded
    ("<think>\\boxed{6}</think> so \\boxed{5}", "5", 1.0),
    ("the model thinks \\boxed{5}</think>\\boxed{6}", "5", 0.0),  # <think> was in the prompt
    ("\\boxed{5} <think>\\boxed{6}", "6", 0.0),  # an unclosed think hides the rest
    ("\\boxed{042}", "42", 1.0),                # AIME integers
    ("\\boxed{1,000}", "Total: #### 1,000", 1.0),  # GSM8K
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "$\\frac12$", 1.0),        # LaTeX gold
    ("\\boxed{\\sqrt{2}}", "\\boxed{\\sqrt 2}", 1.0),
    ("no box at all: 5", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
])
def test_grading(response, answer, expected):
    assert verify_boxed(response, answer) == expected


def test_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\boxed{2") is None
    assert strip_think("<think>x</think>y") == "y"
    assert gold_latex("#### 1,234") == "$1234$"


def test_score_runs_through_a_worker_process():
    assert score("\\boxed{18}", "#### 18") == 1.0
    assert score("\\boxed{19}", "#### 18") == 0.0
