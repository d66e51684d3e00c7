import json
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from cispo.section import RecipeError
from cispo.sections import DataConfig, SourceConfig
from cispo.data import PromptSource, derive_seed, read_rows
from rewards.code import parse_tests
from tests.conftest import REPO

MATH_ROWS = [{"problem": "What is $1+1$?", "solution": "Add: $1+1=\\boxed{2}$."},
             {"problem": "Half of 1?", "solution": "It is \\boxed{\\frac{1}{2}}.", "answer": "\\frac12"}]
APPS_ROWS = [{"question": "Print n+1.", "input_output": json.dumps({"inputs": ["1\n"], "outputs": ["2\n"]}),
              "solutions": json.dumps(["print(int(input())+1)"])},
             {"question": "Add.", "starter_code": "class Solution:", "solutions": "[]",
              "input_output": {"inputs": [[1, 2]], "outputs": [3], "fn_name": "add"}}]


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_answer_after_hashes_and_reference_without_calculator_notes():
    rows, skipped = read_rows(REPO / "data/gsm8k/test.jsonl", "gsm8k", "gsm8k")
    assert len(rows) == 1319 and skipped == 0
    assert rows[0].answer == "18" and rows[0].source == "gsm8k"
    assert "<<" not in rows[0].reference and rows[0].reference.endswith("\\boxed{18}")


def test_humaneval_gz_rows_carry_the_check_for_the_code_reward():
    rows, _ = read_rows(REPO / "data/humaneval/HumanEval.jsonl.gz", "humaneval")
    assert len(rows) == 164
    tests = parse_tests(rows[0].answer)
    assert tests["entry_point"] == "has_close_elements" and "def check" in tests["test"]
    assert rows[0].text.startswith("from typing import List") and rows[0].reference.strip().startswith("for")


def test_math_and_apps_rows(tmp_path):
    math_rows, _ = read_rows(write(tmp_path / "m.jsonl", MATH_ROWS), "math")
    assert [p.answer for p in math_rows] == ["2", "\\frac12"]  # the boxed answer, unless the row names one
    apps, _ = read_rows(write(tmp_path / "a.jsonl", APPS_ROWS), "apps")
    assert parse_tests(apps[0].answer) == {"inputs": ["1\n"], "outputs": ["2\n"]}
    assert apps[0].reference == "print(int(input())+1)" and apps[1].reference is None
    assert apps[1].text == "Add.\nclass Solution:" and parse_tests(apps[1].answer)["fn_name"] == "add"


def test_bad_row_is_an_error_naming_file_and_line_or_counted_and_skipped(tmp_path):
    path = write(tmp_path / "m.jsonl", [MATH_ROWS[0], "{not json", {"problem": "no box", "solution": "2"}, MATH_ROWS[1]])
    with pytest.raises(RecipeError, match=r"m.jsonl:2: bad math row \(JSONDecodeError"):
        read_rows(path, "math")
    rows, skipped = read_rows(path, "math", skip_bad=True)
    assert (len(rows), skipped) == (2, 2)
    cfg = DataConfig(sources=[SourceConfig(name="m", format="math", path=str(path))], on_bad_row="skip")
    assert PromptSource(cfg, 0).skipped == {str(path): 2}


def test_missing_data_file_is_one_line_error(tmp_path):
    cfg = DataConfig(source="gsm8k", path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(RecipeError, match="data file not found: .*nope.jsonl"):
        PromptSource(cfg, 0)


def test_single_source_draws_as_before_mixes_existed():
    src = PromptSource(DataConfig(), seed=3)
    assert src.batch(7) == random.Random(derive_seed(3, 7, "rl")).sample(src.train, 16)
    assert src.batch(7) == src.batch(7) and src.batch(7) != src.batch(8)


def test_seeds_are_the_same_in_every_process_and_differ_per_stream():
    """Not Python's hash(): a resumed run, a Ray actor and a scoring process all derive the same seed."""
    code = "from cispo.data import derive_seed; print(derive_seed(7, 12, 'rl1', 3))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip() for h in (1, 2)}
    assert runs == {str(derive_seed(7, 12, "rl1", 3))}
    seeds = {derive_seed(s, step, stream, i) for s in (0, 1) for step in (1, 2) for stream in ("rl0", "rl1", "sft")
             for i in range(50)}
    assert len(seeds) == 2 * 2 * 3 * 50 and all(0 <= x < 2**32 for x in seeds)


def test_mix_shares_follow_weights_and_the_curriculum(tmp_path):
    cfg = DataConfig(prompts_per_step=64, sources=[
        SourceConfig(name="arith", format="arith", weight=3),
        SourceConfig(name="gsm8k", format="gsm8k", path=str(REPO / "data/gsm8k/test.jsonl"), weight=1),
        SourceConfig(name="code", format="jsonl", path=str(REPO / "data/tiny-code/train.jsonl"), weight=4,
                     start_step=10, ramp_steps=4)])
    src = PromptSource(cfg, seed=0)
    assert src.weights(9) == {"arith": 3, "gsm8k": 1}
    assert src.weights(10) == {"arith": 3, "gsm8k": 1, "code": 1.0} and src.weights(13)["code"] == 4
    early = Counter(p.source for step in range(1, 10) for p in src.batch(step))
    assert set(early) == {"arith", "gsm8k"} and 2.3 < early["arith"] / early["gsm8k"] < 3.9
    late = Counter(p.source for step in range(20, 40) for p in src.batch(step))
    assert 0.85 < late["code"] / late["arith"] < 1.6
    assert src.batch(25) == PromptSource(cfg, seed=0).batch(25)  # exact on resume


def test_mix_validation_names_the_problem():
    with pytest.raises(ValueError, match="source names must be unique"):
        DataConfig(sources=[SourceConfig(name="a", format="arith"), SourceConfig(name="a", format="arith")])
    with pytest.raises(ValueError, match="start_step 0"):
        DataConfig(sources=[SourceConfig(name="a", format="arith", start_step=5)])
