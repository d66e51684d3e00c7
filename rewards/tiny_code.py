"""A tiny templated programming task for CPU runs: from an expression in x, write the program.

Prompt `x*3+1`, reference program `x=int(input());print(x*3+1)`, tests: that expression on a few
values of x through stdin. A small character model learns to copy the expression into the
template during SFT; the code reward then scores its samples through the sandbox.

    python -m rewards.tiny_code data/tiny-code    # writes train.jsonl and eval.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

ALPHABET = "0123456789x+-*=;()intpur"  # every character of prompts and reference programs


def problem(expr: str, rng: random.Random) -> dict:
    xs = rng.sample(range(-20, 50), 3)
    tests = {"inputs": [f"{x}\n" for x in xs], "outputs": [f"{eval(expr, {'x': x})}\n" for x in xs],
             "timeout_s": 1.0, "memory_mb": 256}
    return {"prompt": expr, "answer": json.dumps(tests), "target": f"x=int(input());print({expr})"}


def write(out_dir: str | Path, train: int = 2000, eval_exprs: int = 24, seed: int = 0) -> None:
    """JSONL rows with `prompt`, `answer` (the tests as JSON text, for `rewards.code.score`) and
    `target` (the reference program, for a supervised warm start). Eval expressions never occur in train."""
    rng, out = random.Random(seed), Path(out_dir)
    exprs = [f"x*{a}{op}{b}" for a in range(2, 10) for b in range(1, 10) for op in "+-"]
    rng.shuffle(exprs)
    held_out, seen = exprs[:eval_exprs], exprs[eval_exprs:]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", [problem(rng.choice(seen), rng) for _ in range(train)]),
                       ("eval.jsonl", [problem(e, rng) for e in held_out])):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else "data/tiny-code")
