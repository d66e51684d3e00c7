"""Executions per second: the full sandbox against a bare `subprocess.run([python, file])` loop.

Both run the same small programs one after another in this process; the figure is the median of
several rounds. Prints one JSON line. The sandbox wins by forking a warm interpreter per program
(see rewards/sandbox_server.py) where the bare loop starts a fresh one each time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rewards import sandbox

PROGRAMS = [  # (program, stdin): the shape of competitive-programming answers
    ("a, b = map(int, input().split())\nprint(a + b)", "3 4\n"),
    ("n = int(input())\nprint(sum(i * i for i in range(n)))", "10000\n"),
    ("import sys\nwords = sys.stdin.read().split()\nprint(' '.join(sorted(words)))", "pear apple fig\n"),
    ("from collections import Counter\nprint(Counter(input()).most_common(1)[0][0])", "abracadabra\n"),
]


def bare_round(files: list[Path], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        path, (_, stdin) = files[i % len(files)], PROGRAMS[i % len(PROGRAMS)]
        subprocess.run([sys.executable, str(path)], input=stdin, capture_output=True, text=True, timeout=10)
    return n / (time.perf_counter() - start)


def sandbox_round(n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        program, stdin = PROGRAMS[i % len(PROGRAMS)]
        result = sandbox.run(program, stdin, timeout_s=2.0, memory_mb=256)
        assert result.status == "ok", result
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="executions per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    level = sandbox.isolation()  # probe (and start one server) before timing
    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp, f"p{i}.py") for i in range(len(PROGRAMS))]
        for path, (program, _) in zip(files, PROGRAMS):
            path.write_text(program)
        bare, full = [], []
        for _ in range(args.rounds):  # interleaved, so that load on the machine hits both alike
            bare.append(bare_round(files, args.runs))
            full.append(sandbox_round(args.runs))
    sandbox.close()
    bare_med, full_med = statistics.median(bare), statistics.median(full)
    print(json.dumps({"benchmark": "sandbox_throughput", "isolation": level, "runs_per_round": args.runs,
                      "rounds": args.rounds, "bare_execs_per_s": round(bare_med, 1),
                      "sandbox_execs_per_s": round(full_med, 1), "ratio": round(full_med / bare_med, 2)}))


if __name__ == "__main__":
    main()
