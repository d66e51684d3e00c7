import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards import code

HUMANEVAL = Path(__file__).resolve().parents[2] / "data/humaneval/HumanEval.jsonl.gz"


@pytest.fixture(scope="module")
def humaneval():
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f]


def score_all(rows, response_of):
    with ThreadPoolExecutor(4) as pool:  # each thread gets its own fork-server
        return dict(zip((r["task_id"] for r in rows), pool.map(lambda r: code.score(response_of(r), r), rows)))


def test_every_humaneval_canonical_solution_passes(humaneval):
    scores = score_all(humaneval, lambda r: r["canonical_solution"])
    assert [t for t, s in scores.items() if s != 1.0] == []


def test_broken_humaneval_solutions_fail(humaneval):
    # A body that returns None, and the canonical solution raising halfway through every call.
    assert set(score_all(humaneval[:40], lambda r: "    return None\n").values()) == {0.0}
    raise_first = lambda r: "    raise RuntimeError('broken')\n" + r["canonical_solution"]  # noqa: E731
    assert set(score_all(humaneval[40:80], raise_first).values()) == {0.0}


def test_humaneval_accepts_a_full_function_in_a_fenced_block(humaneval):
    row = humaneval[0]
    full = row["prompt"] + row["canonical_solution"]
    assert code.score(f"<think>use a double loop</think>Here:\n```python\n{full}\n```\nDone.", row) == 1.0


def test_stdio_tests_compare_outputs_here():
    tests = {"inputs": ["1 2\n", "10 20\n"], "outputs": ["3\n", "30\n"]}
    assert code.score("a, b = map(int, input().split())\nprint(a + b)", tests) == 1.0
    assert code.score("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", tests) == 0.0
    assert code.score("a, b = map(int, input().split())\nprint(a + b if a < 5 else 0)", tests, fraction=True) == 0.5
    assert code.score("print(3)", json.dumps(tests), fraction=True) == 0.5  # tests as JSON text


def test_comparators():
    spaced = {"inputs": [""], "outputs": ["1 2\n3"]}
    assert code.score("print(' 1  2 ')\nprint('3 ')", spaced) == 1.0  # whitespace (default)
    assert code.score("print(' 1  2 ')\nprint('3 ')", {**spaced, "comparator": "exact"}) == 0.0
    assert code.score("print('1 2\\n3', end='')", {**spaced, "comparator": "exact"}) == 1.0
    floats = {"inputs": [""], "outputs": ["0.3333333"], "comparator": "float", "tolerance": 1e-6}
    assert code.score("print(1/3)", floats) == 1.0
    assert code.score("print(0.3334)", floats) == 0.0
    assert code.score("print(1/3)", {**floats, "comparator": "whitespace"}) == 0.0


def test_call_based_tests():
    tests = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [3, [[1, 2]]]}  # APPS wraps some outputs
    assert code.score("def add(a, b):\n    return a + b", tests) == 1.0
    assert code.score("def add(a, b):\n    return a - b", tests) == 0.0
    leetcode = {"fn_name": "twice", "inputs": [[4]], "outputs": [8]}
    assert code.score("class Solution:\n    def twice(self, x):\n        return 2 * x", leetcode) == 1.0
    assert code.score("def twice(x):\n    print(8)\n    return 7", leetcode) == 0.0  # printing is not returning


def test_extract_program():
    assert code.extract_program("text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```") == "print(2)\n"
    assert code.extract_program("<think>```python\nprint(1)\n```</think>print(3)") == "print(3)"
