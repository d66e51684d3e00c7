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


@pytest.mark.parametrize("response, answer, expected", [
    ("\\boxed{(1,2)}", "(1,2)", 1.0),        # a tuple (math-verify reads it as an interval)
    ("\\boxed{12}", "(1,2)", 0.0),           # deleting the comma fused it into 12
    ("\\boxed{1}", "0,1", 0.0),              # ... or into 01 = 1
    ("\\boxed{0,1}", "0,1", 1.0),
    ("\\boxed{(2,1)}", "(1,2)", 0.0),
    ("\\boxed{-1}", "(3,-4)", 0.0),          # coordinates: 3-4 = -1 once fused
    ("\\boxed{(3, -4)}", "(3,-4)", 1.0),
    ("\\boxed{[0,1)}", "[0,1)", 1.0),        # intervals keep their ends
    ("\\boxed{[0,1]}", "[0,1)", 0.0),
    ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),  # sets ignore order
    ("\\boxed{12}", "\\{1,2\\}", 0.0),
    ("\\boxed{1, 2, 3}", "1,2,3", 1.0),        # lists
    ("\\boxed{123}", "1,2,3", 0.0),
    ("\\boxed{115000}", "115,000", 1.0),     # thousands separators are the only commas that go
    ("\\boxed{115,000}", "115000", 1.0),
    ("\\boxed{1000000}", "#### 1,000,000", 1.0),
    ("\\boxed{10000}", "10,\\!000", 1.0),    # MATH's spelling
    ("\\boxed{1\\,000}", "1000", 1.0),      # a thin space, which math-verify reads as 1*0
])
def test_gold_answers_keep_their_structure(response, answer, expected):
    assert verify_boxed(response, answer) == expected


@pytest.mark.parametrize("response, answer, expected", [
    ("\\boxed{3}. No wait, it is \\boxed 5", "3", 0.0),  # the abandoned answer is not graded
    ("\\boxed{3}. No wait, it is \\boxed 5", "5", 1.0),
    ("\\boxed{3}. Correction: \\fbox{5}", "3", 0.0),
    ("\\boxed{3}. Correction: \\fbox{5}", "5", 1.0),
    ("\\boxed{3} or rather \\boxed {5}", "5", 1.0),      # a space before the brace
    ("$\\boxed{3}$, no: $\\boxed5$.", "5", 1.0),        # TeX reads \\boxed5 as \\boxed{5}
    ("\\boxed{3}, so finally \\framebox{5}", "5", 1.0),
    ("The answer is \\boxed 42.", "42", 1.0),
    ("\\boxed{3} <answer>5</answer>", "5", 1.0),        # R1-style answer tags
    ("<answer>\\boxed{5}</answer>", "5", 1.0),
    ("\\boxed{3} <answer>5", "3", 0.0),                 # unclosed: no fallback to the box
    ("\\boxed{3} then \\fbox{", "3", 0.0),
    ("\\fbox{3} then \\boxed{}", "3", 0.0),              # an empty last marker is no answer
    ("\\boxed{3}. Final Answer: The final answer is $5$. I hope it is correct.", "5", 1.0),  # Minerva's
    ("\\boxed{3}. **Final Answer:** 5", "3", 0.0),
    ("\\boxed{3}. That is my final answer.", "3", 1.0),   # no marker: states no answer
    ("\\boxed{3}. So the final answer is correct.", "3", 1.0),
    ("3 + 10 = 13, as asked.\nAnswer: $13$", "13", 1.0),  # DAPO-Math-17k's last line (EasyR1 PR #382): was 0.0
    ("\\boxed{3}. Let me recheck.\nAnswer: 13", "13", 1.0),
    ("So $x = 3/4$.\n\n**Answer:** $\\frac{3}{4}$", "\\frac{3}{4}", 1.0),  # ours: the same line, bold, as models write it
    ("ANSWER: 1,000", "1000", 1.0),
    ("\\boxed{3}\nAnswer: see above.", "3", 1.0),       # a line that states no answer is no marker
    ("\\boxed{3}, though the answer: 13 came first", "3", 1.0),  # only at the start of a line
])
def test_the_last_answer_marker_in_any_spelling_is_graded(response, answer, expected):
    assert verify_boxed(response, answer) == expected


def test_helpers():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{1} \\boxed{2") is None
    assert strip_think("<think>x</think>y") == "y"
    assert gold_latex("#### 1,234") == "$1234$"
    assert gold_latex("(1,2)") == "$(1,2)$" and gold_latex("0,1") == "$0,1$"
    assert last_boxed("\\boxed{1} \\fbox{\\frac{1}{2}} b") == "\\frac{1}{2}"


def test_score_runs_through_a_worker_process():
    assert score("\\boxed{18}", "#### 18") == 1.0
    assert score("\\boxed{19}", "#### 18") == 0.0
