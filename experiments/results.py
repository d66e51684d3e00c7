"""Regenerate README's main-job table: `make run`'s recipe over seeds 0-4, each seed's held-out accuracy
before and after RL and its gain, their mean ± sd, with the machine, its load and the date beside them.

    python experiments/results.py [--seeds 0 1 2 3 4] [--runs runs/results] [--readme README.md]

Each seed trains in its own `cispo train` process into RUNS/seed-S; a seed whose summary.json is already
there is read, not trained again (so an interrupted `make results` goes on where it stopped). The table
replaces what README.md holds between the two RESULTS markers. Exact figures differ between CPUs
(their vector units round differently), so the table names the CPU it came from.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny-countdown.yaml"
START, END = "<!-- RESULTS: make results writes from here -->", "<!-- RESULTS: to here -->"


def cpu() -> str:
    """lscpu's model name and this machine's core count, e.g. 'AMD EPYC 7B13, 2 cores'."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def run_seed(seed: int, run_dir: Path) -> dict:
    """The seed's summary.json, training it first unless it is there; with the 1-minute load average at
    the run's start and end (other work on the machine slows it and leaves its figures alone)."""
    summary = run_dir / "summary.json"
    if not summary.exists():
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "cispo.cli", "train", RECIPE, f"run.seed={seed}", f"run.dir={run_dir}",
                        "wandb.mode=disabled"], cwd=REPO, check=True)
        (run_dir / "load.json").write_text(json.dumps([load, os.getloadavg()[0]]))
    out = json.loads(summary.read_text())
    load_file = run_dir / "load.json"
    out["load"] = statistics.fmean(json.loads(load_file.read_text())) if load_file.exists() else float("nan")
    return out


def table(results: dict[int, dict]) -> str:
    """The markdown table, its mean ± sd line, and the machine and date it was measured on."""
    lines = ["| seed | eval accuracy before RL | after | gain | wall time |", "|---|---|---|---|---|"]
    gains = []
    for seed, s in sorted(results.items()):
        gain = s["eval_accuracy_end"] - s["eval_accuracy_start"]
        gains.append(gain)
        lines.append(f"| {seed} | {s['eval_accuracy_start']:.3f} | {s['eval_accuracy_end']:.3f} | {gain:+.3f} | "
                     f"{s['wall_s'] / 60:.1f} min |")
    spread = f" ± {statistics.stdev(gains):.3f}" if len(gains) > 1 else ""
    loads = [s["load"] for s in results.values()]
    lines += ["", f"Gain over seeds {', '.join(map(str, sorted(results)))}: **{statistics.fmean(gains):+.3f}{spread}** "
                  f"(mean ± sd; smallest {min(gains):+.3f}). Measured on {cpu()}, "
                  f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, 1-minute load average "
                  f"{statistics.fmean(loads):.1f} during the runs (the wall times scale with it; the accuracies "
                  f"do not). Exact figures differ between CPUs: their vector units round differently, and a "
                  f"seed's run drifts from there."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--runs", type=Path, default=REPO / "runs/results", help="one run dir per seed under it")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    args = ap.parse_args(argv)
    text = table({seed: run_seed(seed, args.runs / f"seed-{seed}") for seed in args.seeds})
    print(text)
    readme = args.readme.read_text()
    if START not in readme or END not in readme:
        print(f"{args.readme} has no {START} ... {END} markers: the table is printed, not written", file=sys.stderr)
        return 1
    head, rest = readme.split(START, 1)
    args.readme.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
