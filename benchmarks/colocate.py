"""A short run with its rollout replica in the trainer rank (resources.colocate) against one with a
RolloutWorker actor of its own: what a run pays to start and finish, and that the rows are the same.

The run: tiny-arith, 1-digit sums, `--steps` RL steps from a 20-step warm start, one thread per actor. Two
settings, each layout `--repeats` times, interleaved (so that other work on a shared machine weighs on both):
- own_ray: a whole `cispo train` process that starts its own local Ray, as a run on a laptop does;
- shared_ray: `cispo.loop.train` in this process on one Ray started once, as `cispo compare`'s variants
  and the test suite's runs share one.
CPU seconds are the machine's busy time over the run (/proc/stat: user + nice + system + irq + softirq, every
process, Ray's daemons and the scorers included), so other load counts too; the figures are medians over the
repeats and each ratio the median of the repeats' ratios. `same_rows` compares every repeat's metrics rows,
timers left out, across the two layouts.

    python benchmarks/colocate.py [--steps 3] [--repeats 3]

Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = "recipes/tiny-arith.yaml"
LAYOUTS = {"separate": "resources.colocate=false", "colocated": "resources.colocate=true"}


def busy_seconds() -> float:
    """The machine's busy CPU time since boot, in seconds (Linux /proc/stat, all cores)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def args_for(layout: str, steps: int, run_dir: str) -> list[str]:
    return [f"run.dir={run_dir}", "data.digits=1", "data.eval_size=20", "sft.steps=20", "sft.stop_at_accuracy=null",
            f"run.max_steps={steps}", "run.threads=1", "wandb.mode=disabled", LAYOUTS[layout]]


def run(setting: str, layout: str, steps: int, run_dir: str) -> dict:
    cpu0, t0 = busy_seconds(), time.perf_counter()
    if setting == "own_ray":
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        done = subprocess.run([sys.executable, "-m", "cispo.cli", "train", RECIPE, *args_for(layout, steps, run_dir)],
                              cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{layout} run failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    else:
        from cispo.config import load_recipe
        from cispo.loop import train

        train(load_recipe(os.path.join(REPO, RECIPE), args_for(layout, steps, run_dir)))
    wall, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")} for line in f]
    return {"wall_s": wall, "cpu_s": cpu, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="colocate-")
    median = lambda values: round(statistics.median(values), 2)
    line = {"steps": args.steps, "repeats": args.repeats, "cpus": os.cpu_count()}
    same = True
    for setting in ("own_ray", "shared_ray"):
        if setting == "shared_ray":  # started after own_ray's runs, whose figures its idle daemons would join
            import ray

            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(include_dashboard=False, num_cpus=4, log_to_driver=False)  # as tests/conftest.py's
        runs = [{layout: run(setting, layout, args.steps, os.path.join(root, f"{setting}-{layout}-{i}"))
                 for layout in LAYOUTS} for i in range(args.repeats)]
        same = same and all(r["colocated"]["rows"] == r["separate"]["rows"] for r in runs)
        line.update({f"{setting}_{layout}_{k}": median(r[layout][k] for r in runs) for layout in LAYOUTS
                     for k in ("wall_s", "cpu_s")})
        line.update({f"{setting}_colocated_vs_separate_{k}": median(r["colocated"][k] / r["separate"][k] for r in runs)
                     for k in ("wall_s", "cpu_s")})
        line[f"{setting}_cpu_s_each_repeat"] = {layout: [round(r[layout]["cpu_s"], 1) for r in runs] for layout in LAYOUTS}
    line.update({"same_rows": same, "load_1min": round(os.getloadavg()[0], 2)})
    print(json.dumps(line))


if __name__ == "__main__":
    main()
