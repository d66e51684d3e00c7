"""Code correctness: run the response's program in the sandbox, compare its outputs here.

Expected outputs never enter the sandbox, and a pass is decided only by comparing what the program
printed, parsed as plain data: exit code 0 proves nothing (`sys.exit(0)`, `os._exit`, atexit), and
an object whose `__eq__` is always True cannot cross `ast.literal_eval`.

Tests come APPS-style, `{"inputs": [...], "outputs": [...], "fn_name": optional}`, with optional
`comparator` (`exact` | `whitespace` | `float`), `tolerance`, `timeout_s` (CPU seconds per test) and
`memory_mb`; or HumanEval-style, `{"prompt", "test", "entry_point"}`, where the dataset's
`check(candidate)` runs here and each call of `candidate` runs the program in the sandbox.
"""
from __future__ import annotations

import ast
import json
import math
import re

from rewards import sandbox
from rewards.math import strip_think

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_MARK = "\n\x1e cispo-result \x1e"  # the call harness prints the result after the last one
_CALL = """
import ast as _ast, sys as _sys
_args = _ast.literal_eval(_sys.stdin.read())
_fn = (Solution().{name} if "Solution" in globals() and hasattr(Solution, "{name}") else {name})
_result = _fn(*_args)
_sys.stdout.write({mark!r} + repr(_result))
"""


def extract_program(response: str) -> str:
    """The last ```python block of the answer (after any thinking), or the whole answer."""
    answer = strip_think(response)
    blocks = _FENCE.findall(answer)
    return blocks[-1] if blocks else answer


def parse_tests(tests) -> dict:
    """A tests dict, or its JSON / Python-literal text (JSONL readers may hand over a string)."""
    if isinstance(tests, dict):
        return tests
    try:
        return json.loads(tests)
    except json.JSONDecodeError:
        return ast.literal_eval(tests)


def score(response: str, tests, *, fraction: bool = False) -> float:
    """1.0 if the program passes every test (M1), else 0.0; with `fraction`, the share passed."""
    tests = parse_tests(tests)
    if "entry_point" in tests:
        return _humaneval(response, tests)
    program = extract_program(response)
    limits = {"timeout_s": tests.get("timeout_s", 4.0), "memory_mb": tests.get("memory_mb", 512)}
    passed = 0
    for inp, expected in zip(tests["inputs"], tests["outputs"]):
        if tests.get("fn_name"):
            got = _call(program, tests["fn_name"], inp, limits)
            ok = got is not _FAILED and (_same(got, expected, tests) or _same([got], expected, tests))
        else:
            result = _run(program, _text(inp), limits)
            ok = result.status == "ok" and _same_text(result.stdout, _text(expected), tests)
        passed += ok
        if not ok and not fraction:
            return 0.0
    return passed / max(1, len(tests["inputs"]))


def _run(program: str, stdin: str, limits: dict) -> sandbox.SandboxResult:
    result = sandbox.run(program, stdin, **limits)
    if result.status == "sandbox_error":
        raise sandbox.SandboxFailure(result.detail)
    return result


_FAILED = object()


def _call(program: str, name: str, args, limits: dict):
    """`name(*args)` run in the sandbox; its result as plain data, or _FAILED."""
    if not name.isidentifier():
        raise ValueError(f"fn_name {name!r} is not an identifier")
    result = _run(program + _CALL.format(name=name, mark=_MARK), repr(list(args)), limits)
    if result.status != "ok" or _MARK not in result.stdout:
        return _FAILED
    try:
        return ast.literal_eval(result.stdout.rpartition(_MARK)[2])
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # not plain data: a custom object
        return _FAILED


def _text(value) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _same_text(got: str, expected: str, tests: dict) -> bool:
    comparator = tests.get("comparator", "whitespace")
    if comparator == "exact":
        return got == expected
    return _same(got.split(), expected.split(), tests)  # token-wise: line ends and spacing do not count


def _same(got, expected, tests: dict) -> bool:
    """Equality on plain data; numbers within `tolerance` when the comparator is `float`."""
    if tests.get("comparator") == "float":
        try:
            a, b = float(got), float(expected)
            tol = tests.get("tolerance", 1e-6)
            return math.isclose(a, b, rel_tol=tol, abs_tol=tol)
        except (TypeError, ValueError):
            pass
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) == len(expected) and all(_same(g, e, tests) for g, e in zip(got, expected))
    return type(got) in (int, float, str, bool, type(None), dict, set, frozenset, bytes, complex) and got == expected


def _humaneval(response: str, tests: dict) -> float:
    """The dataset's `check(candidate)` runs here; each `candidate(...)` runs the program in the sandbox."""
    code, name = extract_program(response), tests["entry_point"]
    # A bare completion continues the prompt; a full solution redefines the function after the stub.
    defines = re.search(rf"^def {re.escape(name)}\s*\(", code, re.MULTILINE)
    program = tests["prompt"] + ("\n" + code if defines else code)
    limits = {"timeout_s": tests.get("timeout_s", 4.0), "memory_mb": tests.get("memory_mb", 512)}
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
