"""Does asynchronous training at staleness 2 end where synchronous training does? tiny-countdown over seeds.

One warm start (the recipe's SFT with seed 0, `run.max_steps=0`), and from it, for each seed (its RL
sampling and prompt order), three RL runs of equal steps:
- synchronous: the recipe as it is (rollout.max_staleness=0);
- asynchronous: `rollout.overlap=true` (step t + 1 generates while step t trains) and
  `rollout.partial_tokens=4` (a response of more than 4 tokens pauses and continues next step under new
  weights), so a trained token is up to 2 versions old (`rollout.max_staleness=2`). Countdown's answers
  are 5 characters and an end token, so nearly every response pauses once and trains 2 versions old;
- asynchronous, masked: the same with M1's masked CISPO (Eq. 6-7, `algorithm.name=cispo_masked
  algorithm.eps_low=0.2`): a token with A < 0 whose weight fell below 0.8 gets no gradient. With
  M1's unmasked loss, stale samples let a negative advantage keep pushing down a token (`<eos>`) the
  current policy already made less likely, with no sample of the alternative drawn yet to push back
  (README, issue 19); the mask stops that push.

All evaluate on the recipe's 500 held-out prompts. The check: an asynchronous mode's mean final accuracy
lies within the synchronous runs' seed spread (their min to max). With partial rollouts dynamic sampling
drops groups without spread and does not refill (README, issue 19), so an asynchronous step may train
fewer groups; `trained_groups` is in the table.

    python experiments/async_staleness.py [--seeds 0 1 2] [--steps 100] [--runs runs/async-staleness]

The runs live in RUNS/warm and RUNS/seed-S/{sync,async,masked}; one whose summary.json is there is read, not
run again.
Prints a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny-countdown.yaml"
ASYNC = ["rollout.overlap=true", "rollout.partial_tokens=4", "rollout.max_staleness=2"]
MODES = {"sync": [], "async": ASYNC, "masked": [*ASYNC, "algorithm.name=cispo_masked", "algorithm.eps_low=0.2"]}


def run(run_dir: Path, *overrides: str) -> dict:
    """`cispo train` of the recipe into `run_dir` (unless its summary.json is there), with the mean
    1-minute load average at its start and end; returns its summary and metrics rows."""
    if not (run_dir / "summary.json").exists():
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, "-m", "cispo.cli", "train", RECIPE, f"run.dir={run_dir}", "wandb.mode=disabled",
                        *overrides], cwd=REPO, check=True)
        (run_dir / "load.json").write_text(json.dumps([load, os.getloadavg()[0]]))
    metrics = run_dir / "metrics.jsonl"  # none after a warm start alone
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return {**json.loads((run_dir / "summary.json").read_text()), "rows": rows,
            "load": statistics.fmean(json.loads((run_dir / "load.json").read_text()))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=100, help="RL steps of every run (the recipe's 100 by default)")
    ap.add_argument("--runs", type=Path, default=REPO / "runs/async-staleness")
    args = ap.parse_args(argv)
    out = {}
    run(args.runs / "warm", "run.max_steps=0")
    for seed in args.seeds:
        for mode, extra in MODES.items():
            out[seed, mode] = run(args.runs / f"seed-{seed}" / mode, f"run.seed={seed}", f"run.max_steps={args.steps}",
                                  "sft.steps=0", f"model.path={args.runs / 'warm' / 'final'}", *extra)
    lines = ["| seed | before RL | sync after | async after | async masked after | trained groups/step (sync, async, "
             "masked) | async tokens 2 versions old |", "|---|---|---|---|---|---|---|"]
    for seed in args.seeds:
        s, a, m = (out[seed, mode] for mode in MODES)
        groups = [statistics.fmean(r.get("trained_groups", 0) for r in out[seed, mode]["rows"]) for mode in MODES]
        stale = [sum(r.get(f"staleness_{k}", 0) for r in a["rows"]) for k in range(3)]
        lines.append(f"| {seed} | {s['eval_accuracy_start']:.3f} | {s['eval_accuracy_end']:.3f} | "
                     f"{a['eval_accuracy_end']:.3f} | {m['eval_accuracy_end']:.3f} | "
                     f"{', '.join(f'{g:.1f}' for g in groups)} | {stale[2] / max(1, sum(stale)):.0%} |")
    ends = {m: [out[seed, m]["eval_accuracy_end"] for seed in args.seeds] for m in MODES}
    mean = {m: statistics.fmean(v) for m, v in ends.items()}
    sd = {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in ends.items()}
    within = {m: min(ends["sync"]) <= mean[m] <= max(ends["sync"]) for m in ("async", "masked")}
    print("\n".join(lines))
    print(f"\nAfter {args.steps} RL steps: synchronous {mean['sync']:.3f} ± {sd['sync']:.3f} (seed spread "
          f"{min(ends['sync']):.3f}-{max(ends['sync']):.3f}); at staleness 2, " + ", ".join(
              f"{name} {mean[m]:.3f} ± {sd[m]:.3f} ({'within' if within[m] else 'outside'} the synchronous spread)"
              for m, name in (("async", "asynchronous"), ("masked", "asynchronous masked"))) + ".")
    print(json.dumps({"steps": args.steps, "seeds": args.seeds, "sync_end": ends["sync"], "async_end": ends["async"],
                      "masked_end": ends["masked"], "async_within_sync_spread": within["async"],
                      "masked_within_sync_spread": within["masked"],
                      "load": round(statistics.fmean(r["load"] for r in out.values()), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
