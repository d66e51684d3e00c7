import gzip
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rewards import code, sandbox
from rewards.config import RewardConfig
from rewards.pool import ScoringPool
from rewards.registry import build
from rewards.types import RewardInput

REPO = Path(__file__).resolve().parents[2]
HUMANEVAL = REPO / "data/humaneval/HumanEval.jsonl.gz"


def humaneval_rows() -> list[dict]:
    with gzip.open(HUMANEVAL, "rt") as f:
        return [json.loads(line) for line in f]


def humaneval_sample() -> list[dict]:
    """The tasks checked at the weaker levels and with a moved interpreter, where a failure comes from
    the level and not the task: every 8th, and each that imports a module beyond typing (what the
    level must let a program load: math, hashlib)."""
    imports = lambda r: any("import" in line and "typing" not in line
                            for line in (r["prompt"] + r["canonical_solution"]).splitlines())
    return [r for i, r in enumerate(humaneval_rows()) if i % 8 == 0 or imports(r)]


@pytest.fixture(scope="module")
def humaneval():
    return humaneval_rows()


def score_all(rows, response_of, level: str = "mountns"):
    with ThreadPoolExecutor(4) as pool:  # each thread gets its own fork-server
        return dict(zip((r["task_id"] for r in rows),
                        pool.map(lambda r: code.score(response_of(r), r, min_isolation=level), rows)))


def broken(row: dict, i: int) -> str:
    """A body that returns None, or the canonical solution raising halfway through every call."""
    return "    return None\n" if i % 2 else "    raise RuntimeError('broken')\n" + row["canonical_solution"]


def humaneval_at(level: str, rows: list[dict]) -> dict:
    """All canonical solutions and a broken variant of each, scored with `level` forced: the tasks
    that did not score 1 and 0, or why the level was refused."""
    os.environ[sandbox.FORCE_ENV] = level
    sandbox.close()  # forget the level probed before
    try:
        sandbox.isolation(level)
    except sandbox.SandboxUnavailable as exc:
        return {"refused": str(exc)}
    finally:
        del os.environ[sandbox.FORCE_ENV]
    canonical = score_all(rows, lambda r: r["canonical_solution"], level)
    variants = {r["task_id"]: broken(r, i) for i, r in enumerate(rows)}
    wrong = score_all(rows, lambda r: variants[r["task_id"]], level)
    return {"level": sandbox.isolation(level), "canonical_failed": [t for t, s in canonical.items() if s != 1.0],
            "broken_passed": [t for t, s in wrong.items() if s != 0.0]}


def offered(level: str, interpreter_readable: bool) -> bool:
    """Whether this machine should accept `level`, judged from its facts, not from rewards.sandbox."""
    root = os.geteuid() == 0
    return {"bwrap": root and bool(shutil.which("bwrap")),
            "mountns": root and all(shutil.which(t) for t in ("unshare", "mount", "chroot", "setpriv")),
            "uid": root and interpreter_readable, "rlimits": not root}[level]


def readable_by_others(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in path.parents) and bool(path.stat().st_mode & 0o004)


def check_every_level(report: dict, interpreter_readable: bool) -> None:
    for level, got in report.items():
        if offered(level, interpreter_readable):
            assert got == {"level": level, "canonical_failed": [], "broken_passed": []}
        else:  # refused with one line that names the level, never used
            assert "refused" in got and "\n" not in got["refused"] and f"{level}: " in got["refused"], got


@pytest.mark.parametrize("level", sandbox.LEVELS)
def test_every_humaneval_solution_scores_1_and_every_broken_one_0_at_each_level(humaneval, level):
    """All 164 tasks at the strongest level offered here (the one runs use), the sample at the others."""
    stdlib = Path(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}", "ast.py")
    readable = readable_by_others(stdlib)
    strongest = next((lv for lv in sandbox.LEVELS if offered(lv, readable)), None)
    try:
        check_every_level({level: humaneval_at(level, humaneval if level == strongest else humaneval_sample())},
                          readable)
    finally:
        sandbox.close()


def test_humaneval_where_the_sandbox_uid_cannot_read_the_interpreter(tmp_path):
    """The interpreter moved (bind-mounted, in a private mount namespace) under a 0700 directory,
    as pyenv under /root is; every level must still score the HumanEval sample right, or be refused."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("building the set-up needs root and util-linux's unshare")
    closed = tmp_path / "closed"
    (closed / "python").mkdir(parents=True)
    closed.chmod(0o700)
    exe = closed / "python" / Path(os.path.realpath(sys.executable)).relative_to(os.path.realpath(sys.base_prefix))
    child = ("import json, sys; from tests.rewards.test_code import humaneval_at, humaneval_sample; "
             "assert sys.base_prefix.startswith(sys.argv[1]), sys.base_prefix; rows = humaneval_sample(); "
             "print(json.dumps({lv: humaneval_at(lv, rows) for lv in ('bwrap', 'mountns', 'uid', 'rlimits')}))")
    script = 'mount --bind "$1" "$2/python" && exec "$3" -c "$4" "$2"'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), sysconfig.get_paths()["purelib"]])}
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                          os.path.realpath(sys.base_prefix), str(closed), str(exe), child],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check_every_level(json.loads(out.stdout.splitlines()[-1]), interpreter_readable=False)


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


@pytest.mark.parametrize("printed, expected, score", [
    ("1/3", "0.3333333", 1.0),                  # APPS's harness and contest checkers: 1e-6 abs or rel
    ("0.5", "0.500000", 1.0),
    ("2", "2.000000", 1.0),
    ("'%.4f' % (1e12 / 7)", "142857142857.142857", 1.0),  # relative
    ("1e-7", "0", 1.0),                         # absolute, near 0
    ("0.3334", "0.3333333", 0.0),
    ("1000001", "1000000", 0.0),                # integers must be equal, however close
    ("'YES'", "yes", 0.0),
    ("float('nan')", "nan", 1.0),              # the same token
    ("'1 2.0000001 x'", "1 2 x", 1.0),          # token by token
])
def test_numbers_compare_within_the_judges_tolerance(printed, expected, score):
    assert code.score(f"print({printed})", {"inputs": [""], "outputs": [expected]}) == score


def test_comparators_and_tolerance():
    spaced = {"inputs": [""], "outputs": ["1 2\n3"]}
    assert code.score("print(' 1  2 ')\nprint('3 ')", spaced) == 1.0  # whitespace (default)
    assert code.score("print(' 1  2 ')\nprint('3 ')", {**spaced, "comparator": "exact"}) == 0.0
    assert code.score("print('1 2\\n3', end='')", {**spaced, "comparator": "exact"}) == 1.0
    third = {"inputs": [""], "outputs": ["0.3333333"]}
    assert code.score("print(1/3)", {**third, "tolerance": 0}) == 0.0
    assert code.score("print(0.3334)", {**third, "tolerance": 1e-3}) == 1.0
    with pytest.raises(ValueError, match="unknown comparator 'float'"):
        code.score("print(1)", {**third, "comparator": "float"})


@pytest.mark.parametrize("tests, message", [
    ({"inputs": ["1\n", "2\n"], "outputs": ["2\n"]}, "got 2 inputs and 1 outputs"),  # scored 0.5, never ran input 2
    ({"inputs": [], "outputs": []}, "got 0 inputs and 0 outputs"),  # scored 0.0
    ({"fn_name": "f", "inputs": [[1]]}, "'outputs' must be a list, got NoneType"),
    ({"inputs": "1\n", "outputs": "2\n"}, "'inputs' must be a list, got str"),  # ours: zip walked the characters
])
def test_malformed_tests_are_a_counted_reward_error_not_a_score(tests, message):
    """olmo-eval PR #354: malformed tests are the data's fault; a score would teach the model from it."""
    with pytest.raises(ValueError, match=message):
        code.score("print(int(input()) + 1)", tests, fraction=True)
    reward = build(RewardConfig(name="code", fraction=True), "code")  # as a recipe's scoring processes call it
    with ScoringPool(num_workers=1) as pool:
        [result] = pool.map(reward, [RewardInput("", "print(int(input()) + 1)", json.dumps(tests), "code")])
    assert (result.score, result.status) == (0.0, "error") and message in result.error


def test_integers_beyond_4300_digits_in_programs_tests_and_results():
    big = 7 ** 9000  # 7,606 digits: past Python's default int<->str limit
    assert code.score("print(7 ** 9000)", {"inputs": [""], "outputs": [str(big)]}) == 1.0
    assert code.score("print(7 ** 9000 + 1)", {"inputs": [""], "outputs": [str(big)]}) == 0.0
    doubled = {"inputs": [str(big)], "outputs": [str(2 * big)]}  # the program parses it from stdin
    assert code.score("print(2 * int(input()))", doubled) == 1.0
    call = json.dumps({"fn_name": "power", "inputs": [[7, 9000]], "outputs": [big]})  # parsed here from JSON
    assert code.score("def power(a, b):\n    return a ** b", call) == 1.0
    assert code.score("def power(a, b):\n    return a ** b - 1", call) == 0.0


def test_call_based_tests():
    tests = {"fn_name": "add", "inputs": [[1, 2], [[1], [2]]], "outputs": [3, [[1, 2]]]}  # APPS wraps some outputs
    assert code.score("def add(a, b):\n    return a + b", tests) == 1.0
    assert code.score("def add(a, b):\n    return a - b", tests) == 0.0
    leetcode = {"fn_name": "twice", "inputs": [[4]], "outputs": [8]}
    assert code.score("class Solution:\n    def twice(self, x):\n        return 2 * x", leetcode) == 1.0
    assert code.score("def twice(x):\n    print(8)\n    return 7", leetcode) == 0.0  # printing is not returning
    floats = {"fn_name": "f", "inputs": [[]], "outputs": [[0.3, {"k": 0.3}]]}
    assert code.score("def f():\n    return [0.1 + 0.2, {'k': 0.1 + 0.2}]", floats) == 1.0
    assert code.score("def f():\n    return [0.31, {'k': 0.3}]", floats) == 0.0


@pytest.mark.parametrize("response, program", [
    ("```python3\nprint(3)\n```", "print(3)\n"),           # the language tag in any common spelling
    ("```Python\nprint(3)\n```", "print(3)\n"),
    ("~~~py\nprint(3)\n~~~", "print(3)\n"),
    ("```python\nprint(2)\n```\nOutput:\n```\n2\n```", "print(2)\n"),  # a later output block is no program
    ("```\nprint(1)\n```\nBetter:\n```\nprint(2)\n```", "print(2)\n"),
    ("```python\nprint(1)\n```\nBetter:\n```python\nprint(2)", "print(2)"),  # cut off: still the last one
    ("text\n```python\nprint(1)\n```\nmore\n```python\nprint(2)\n```", "print(2)\n"),
    ("<think>```python\nprint(1)\n```</think>print(3)", "print(3)"),
])
def test_extract_program(response, program):
    assert code.extract_program(response) == program
