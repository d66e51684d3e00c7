"""Code correctness: run the response's program in the sandbox, compare its outputs here.

Expected outputs never enter the sandbox, and a pass is decided only by comparing what the program
printed, parsed as plain data: exit code 0 proves nothing (`sys.exit(0)`, `os._exit`, atexit), and
an object whose `__eq__` is always True cannot cross `ast.literal_eval`.

Tests come APPS-style, `{"inputs": [...], "outputs": [...], "fn_name": optional}`, with optional
`comparator` (`whitespace`, the default: token by token; or `exact`), `tolerance` (default 1e-6),
`timeout_s` (CPU seconds per test) and `memory_mb`; or HumanEval-style, `{"prompt", "test",
"entry_point"}`, where the dataset's `check(candidate)` runs here and each call of `candidate` runs
the program in the sandbox. Numbers compare as APPS's harness and contest checkers compare them:
within `tolerance` absolute or relative, unless both are integers, which must be equal.
"""
from __future__ import annotations

import ast
import json
import math
import re
import sys

from rewards import sandbox
from rewards.math import strip_think

# Python's 4,300-digit limit on int<->str turns correct big-integer answers into errors when tests,
# arguments or results are parsed here; the sandboxed program runs without it too (sandbox_server).
sys.set_int_max_str_digits(0)

_OPEN = re.compile(r"(`{3,}|~{3,})[ \t]*([^\s`~]*)[^\n]*\n")  # a fence and its language tag
_PYTHON = {"python", "python3", "py", "py3"}
_INTEGER = re.compile(r"[-+]?\d+")
COMPARATORS = ("whitespace", "exact")


def extract_program(response: str) -> str:
    """The answer's (after any thinking) last fenced block tagged Python (```python, ```py, ~~~python3,
    any case), else its last untagged block, else the whole answer. An unclosed last block runs to
    the end: a later, cut-off answer is still the answer, never an earlier one."""
    answer = strip_think(response)
    blocks, pos = [], 0
    while fence := _OPEN.search(answer, pos):
        end = answer.find(fence[1], fence.end())
        blocks.append((fence[2].lower(), answer[fence.end():end if end >= 0 else len(answer)]))
        if end < 0:
            break
        pos = end + len(fence[1])
    python = [body for lang, body in blocks if lang in _PYTHON]
    untagged = [body for lang, body in blocks if not lang]
    return python[-1] if python else untagged[-1] if untagged else answer


def parse_tests(tests) -> dict:
    """A tests dict, or its JSON / Python-literal text (JSONL readers may hand over a string)."""
    if isinstance(tests, dict):
        return tests
    try:
        return json.loads(tests)
    except json.JSONDecodeError:
        return ast.literal_eval(tests)


def score(response: str, tests, *, fraction: bool = False, min_isolation: str = "mountns") -> float:
    """1.0 if the program passes every test (M1), else 0.0; with `fraction`, the share passed.
    Programs run at the strongest sandbox level here, at least `min_isolation` (`rewards.sandbox`).
    Raises SandboxFailure when the sandbox, not the program, failed, and ValueError on bad tests (an
    unknown comparator; inputs and outputs that are not lists of the same non-zero length)."""
    tests = parse_tests(tests)
    limits = {"timeout_s": tests.get("timeout_s", 4.0), "memory_mb": tests.get("memory_mb", 512),
              "min_isolation": min_isolation}
    if "entry_point" in tests:
        return _humaneval(response, tests, limits)
    comparator, tol = tests.get("comparator", "whitespace"), tests.get("tolerance", 1e-6)
    if comparator not in COMPARATORS:
        raise ValueError(f"tests: unknown comparator {comparator!r}; valid: {', '.join(COMPARATORS)}")
    cases = _cases(tests)
    program = extract_program(response)
    passed = 0
    for inp, expected in cases:
        if tests.get("fn_name"):
            got = _call(program, tests["fn_name"], inp, limits)
            ok = got is not _FAILED and (_same(got, expected, tol) or _same([got], expected, tol))
        else:
            result = _run(program, _text(inp), limits)
            ok = result.status == "ok" and _same_text(result.stdout, _text(expected), comparator, tol)
        passed += ok
        if not ok and not fraction:
            return 0.0
    return passed / len(cases)


def _cases(tests: dict) -> list[tuple]:
    """The (input, expected output) pairs. ValueError, which the scoring pool counts as a reward error,
    for malformed tests: zip would silently drop inputs without an output (2 inputs and 1 output scored
    0.5 with `fraction` and never ran the second; olmo-eval PR #354), no tests would score 0, and a
    string in place of a list would be compared character by character."""
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    for key, value in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(value, list):
            raise ValueError(f"tests: {key!r} must be a list, got {type(value).__name__}")
    if not inputs or len(inputs) != len(outputs):
        raise ValueError(f"tests: need one output per input and at least one test, got {len(inputs)} inputs and "
                         f"{len(outputs)} outputs")
    return list(zip(inputs, outputs))


def _run(program: str, stdin: str, limits: dict) -> sandbox.SandboxResult:
    result = sandbox.run(program, stdin, **limits)
    if result.status == "sandbox_error":
        raise sandbox.SandboxFailure(result.detail)
    return result


_FAILED = object()


def _call(program: str, name: str, args, limits: dict):
    """`name(*args)` run in the sandbox; its result as plain data, or _FAILED."""
    result = _run(sandbox.call_program(program, name), repr(list(args)), limits)
    if result.status != "ok" or sandbox.CALL_MARK not in result.stdout:
        return _FAILED
    try:
        return ast.literal_eval(result.stdout.rpartition(sandbox.CALL_MARK)[2])
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # not plain data: a custom object
        return _FAILED


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_text(got: str, expected: str, comparator: str, tol: float) -> bool:
    if comparator == "exact":
        return got == expected
    got, expected = got.split(), expected.split()  # token-wise: line ends and spacing do not count
    return len(got) == len(expected) and all(g == e or _close_numbers(g, e, tol) for g, e in zip(got, expected))


def _close_numbers(got: str, expected: str, tol: float) -> bool:
    """Two printed numbers, not both integers, within `tol` absolute or relative."""
    if _INTEGER.fullmatch(got) and _INTEGER.fullmatch(expected):
        return False
    try:
        a, b = float(got), float(expected)
    except ValueError:
        return False
    return math.isfinite(a) and math.isfinite(b) and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _same(got, expected, tol: float) -> bool:
    """Equality on plain data; a float against a number within `tol` absolute or relative."""
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(_same(g, e, tol) for g, e in zip(got, expected))
    if isinstance(got, dict) and isinstance(expected, dict):
        return got.keys() == expected.keys() and all(_same(got[k], expected[k], tol) for k in got)
    if float in (type(got), type(expected)) and {type(got), type(expected)} <= {int, float}:
        return math.isclose(got, expected, rel_tol=tol, abs_tol=tol)
    return type(got) in (int, float, str, bool, type(None), set, frozenset, bytes, complex) and got == expected


def _humaneval(response: str, tests: dict, limits: dict) -> float:
    """The dataset's `check(candidate)` runs here; each `candidate(...)` runs the program in the sandbox."""
    code, name = extract_program(response), tests["entry_point"]
    # A bare completion continues the prompt; a full solution redefines the function after the stub.
    defines = re.search(rf"^def {re.escape(name)}\s*\(", code, re.MULTILINE)
    program = tests["prompt"] + ("\n" + code if defines else code)
    cache: dict[str, object] = {}

    def candidate(*args):
        key = repr(args)
        if key not in cache:
            cache[key] = _call(program, name, args, limits)
        if cache[key] is _FAILED:
            raise AssertionError("the program failed or returned something that is not plain data")
        return cache[key]

    namespace: dict = {}
    exec(tests["prompt"] + "\n" + tests["test"], namespace)  # dataset code: helpers the check may use
    namespace[name] = candidate  # some checks call the function by its own name (HumanEval/33)
    try:
        namespace["check"](candidate)
    except sandbox.SandboxFailure:
        raise
    except Exception:  # a failed assertion, or the check choking on a wrong answer
        return 0.0
    return 1.0
