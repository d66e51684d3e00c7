"""Countdown: reach a target with the given numbers, each used exactly once, with + - * / and parentheses.

Any expression that reaches the target scores, so many answers are right (3+5*2 and 2*5+3 both
make 13 from 3,5,2). The verifier parses the response with `ast` and evaluates only integer
literals, the four operators and parentheses, in exact `Fraction` arithmetic; nothing the model
writes is executed.

The tiny task has three numbers from 1-9 and a target that + and - reach with the numbers in the
order given (`7,9,4:2=` -> `7-9+4`; the verifier also takes `4+7-9` or `(7+4)-9`). It ships no
solutions: each row's `target` (what a warm start imitates) is an imperfect demonstrator's attempt,
the numbers in order joined by random operators, right by chance on about a quarter of the rows.
Supervised learning copies the format but cannot learn to pick the operators from it; only the
reward can teach that.

    python -m rewards.countdown data/countdown [OPS]   # writes train.jsonl and eval.jsonl; OPS: +- (default) or +-*
"""
from __future__ import annotations

import ast
import itertools
import json
import operator
import random
import sys
from collections import Counter
from fractions import Fraction
from pathlib import Path

ALPHABET = "0123456789,:=+-*"  # every character of prompts and demonstrations, with either set of operators
_RESPONSE_CHARS = frozenset("0123456789+-*/() ")  # what a response may hold: no names, no calls, no floats
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_MAX_RESPONSE_CHARS = 200  # far above any sensible answer; bounds the parser's work


def problem_text(numbers: list[int], target: int) -> str:
    """The prompt: `3,5,2:13=`, so that the response completes the equation `13=3*5-2`."""
    return f"{','.join(map(str, numbers))}:{target}="


def parse_answer(answer: str) -> tuple[list[int], int]:
    """The numbers and target from the gold `answer`, JSON text `{"numbers": [3, 5, 2], "target": 13}`.

    Raises ValueError naming the problem: a malformed gold answer is the data's fault, never a 0.
    """
    try:
        gold = json.loads(answer)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"countdown answer is not JSON text ({exc}): {answer!r}") from None
    numbers, target = (gold.get("numbers"), gold.get("target")) if isinstance(gold, dict) else (None, None)
    if not (isinstance(numbers, list) and numbers and all(_is_int(n) and n >= 0 for n in numbers)):
        raise ValueError(f"countdown answer needs 'numbers', a non-empty list of non-negative integers: {answer!r}")
    if not _is_int(target):
        raise ValueError(f"countdown answer needs an integer 'target': {answer!r}")
    return numbers, target


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """The exact value of an arithmetic expression and the integer literals it uses, or None when it
    is not one (other characters or syntax, unary minus, a division by zero, too long)."""
    if len(expression) > _MAX_RESPONSE_CHARS or not set(expression) <= _RESPONSE_CHARS:
        return None
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[int] = []

    def value(node) -> Fraction:
        if isinstance(node, ast.Constant) and _is_int(node.value):
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        raise ValueError(f"not allowed in a countdown answer: {type(node).__name__}")

    try:
        return value(tree.body), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def score(response: str, answer: str) -> float:
    """1.0 when `response` is an expression that uses each of the answer's numbers exactly once (as
    a multiset) and equals its target exactly, else 0.0. Raises ValueError on a malformed `answer`."""
    numbers, target = parse_answer(answer)
    result = evaluate(response)
    if result is None:
        return 0.0
    value, literals = result
    return float(Counter(literals) == Counter(numbers) and value == target)


# ---------------------------------------------------------------- the tiny task's data

def _chain(numbers, ops) -> str:
    """`3*5-2` from (3, 5, 2) and ('*', '-'): no parentheses, usual precedence."""
    return str(numbers[0]) + "".join(op + str(n) for op, n in zip(ops, numbers[1:]))


def attempt(numbers, rng: random.Random, ops: str) -> str:
    """The demonstrator: the numbers in the order given, joined by random operators."""
    return _chain(numbers, [rng.choice(ops) for _ in numbers[1:]])


def problem(numbers, target: int, rng: random.Random, ops: str) -> dict:
    return {"prompt": problem_text(numbers, target),
            "answer": json.dumps({"numbers": list(numbers), "target": target}),
            "target": attempt(numbers, rng, ops)}


def problems(ops: str, size: int = 3, high: int = 9) -> list[tuple[tuple[int, ...], int]]:
    """Every (numbers, target) problem with `size` numbers from 1..high, in order, and a target that a
    chain of them in that order reaches (`ops`, no parentheses): so every problem is solvable, in
    the order the prompt lists the numbers."""
    return sorted({(numbers, int(evaluate(_chain(numbers, chosen))[0]))
                   for numbers in itertools.product(range(1, high + 1), repeat=size)
                   for chosen in itertools.product(ops, repeat=size - 1)})


def write(out_dir: str | Path, ops: str = "+-", held_out: int = 500, seed: int = 0) -> dict[str, float]:
    """JSONL rows with `prompt`, `answer` (numbers and target as JSON text, for `score`) and `target`
    (the demonstrator's attempt, for the warm start): `held_out` problems in eval.jsonl, in train.jsonl
    every problem that is not one of them in another order. Returns the demonstrator's accuracy
    on each file."""
    rng, out = random.Random(seed), Path(out_dir)
    found = problems(ops)
    rng.shuffle(found)
    held = found[:held_out]
    unseen = {(tuple(sorted(numbers)), target) for numbers, target in held}
    train = [(numbers, target) for numbers, target in found[held_out:] if (tuple(sorted(numbers)), target) not in unseen]
    out.mkdir(parents=True, exist_ok=True)
    accuracy = {}
    for name, split in (("eval.jsonl", held), ("train.jsonl", train)):
        rows = [problem(numbers, target, rng, ops) for numbers, target in split]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        accuracy[name] = sum(score(r["target"], r["answer"]) for r in rows) / len(rows)
    return accuracy


if __name__ == "__main__":
    for name, acc in write(*sys.argv[1:3]).items():
        print(f"{name}: the demonstrator is right on {acc:.3f} of rows")
