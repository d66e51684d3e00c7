"""Synchronous vs partial vs asynchronous + partial rollouts, on a long-tailed response budget.

Three real runs of `cispo train` (cispo.loop.train: a RolloutWorker, a DeepSpeed trainer rank and the
scoring processes, all as the loop runs them) in this one process tree, one after the other on one Ray:

- synchronous: each step generates every response to its end, then trains (rollout.max_staleness=0);
- partial: each step decodes at most `--chunk` tokens per response (rollout.partial_tokens); unfinished
  responses are paused and continued next step, and a step trains the groups that finished;
- async_partial: the same, and step t+1 generates while step t trains (rollout.overlap).

The long tail is made with M1's own repetition stop, set loose (`rollout.repetition_tokens=1`,
`repetition_prob=--stop-prob`): a response ends at the first token sampled with probability above it. On
the random tiny model this gives a stand-in for a reasoning model's lengths, most short and a few at the
budget (measured: median 19, p90 50, max 128 of 128 tokens). The rewards are all 0 there, so advantages
are 0 and the weights stay put: every mode meets the same length distribution at every step. Each mode's
first budget/chunk + 1 steps fill its pipeline and are left out, and so is the last (it evaluates);
figures are over the steps between.

Trained tokens/s = response tokens trained (the rows' staleness_* counts) / the steps' wall time.
With `--repeats R` the three run R times, interleaved (so that the other work on a shared machine weighs
on each mode alike); each figure is the median over the repeats, each ratio the median of the repeats'
ratios, and the 1-minute load average around every run is reported.

Then a cluster simulation (`simulate`), its assumptions stated in its docstring and in the JSON line.

    python benchmarks/async_throughput.py [--steps 12] [--budget 128] [--chunk 32] [--threads 1] [--repeats 1]

Prints one JSON line with the three modes' figures and their ratios to synchronous.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import tempfile

from cispo.config import load_recipe
from cispo.loop import train
from cispo.metrics import read_metrics
from cispo.plan import model_shape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(mode: list[str], args, run_dir: str) -> dict:
    recipe = load_recipe(os.path.join(REPO, "recipes/tiny-arith.yaml"), [
        f"run.dir={run_dir}", f"run.max_steps={args.steps}", f"run.save_every={args.steps}", "run.eval_every=0",
        f"run.threads={args.threads}", "sft.steps=0", "data.eval_size=4", "data.prompts_per_step=16",
        "rollout.n_samples=8", f"rollout.max_new_tokens={args.budget}", "rollout.repetition_tokens=1",
        f"rollout.repetition_prob={args.stop_prob}", "algorithm.dynamic_sampling=false", "wandb.mode=disabled",
        "resources.colocate=false", *mode])  # a worker of its own, so that rollout can overlap training
    load = os.getloadavg()[0]
    train(recipe)
    load = (load + os.getloadavg()[0]) / 2
    rows = read_metrics(run_dir)[args.skip:-1]  # the last step also evaluates
    tokens = sum(v for r in rows for k, v in r.items() if k.startswith("staleness_"))
    wall = sum(r["time_step_s"] for r in rows)
    return {"trained_tokens_per_s": round(tokens / wall, 1), "step_s_median": round(statistics.median(
        r["time_step_s"] for r in rows), 2), "trained_tokens": tokens, "wall_s": round(wall, 1),
        "max_staleness_seen": max((int(k.split("_")[1]) for r in rows for k in r if k.startswith("staleness_")),
                                  default=0), "load": round(load, 1)}


def simulate(recipe_path: str, budget: int, chunk: int, steps: int = 200, seed: int = 0) -> dict:
    """Seconds per step and trained tokens/s of the three modes on a cluster, from per-token FLOPs of
    `cispo plan` (the recipe's model shape). Assumptions:
    - rollout and training on separate GPUs (the recipe's rollout workers x GPUs, and trainer ranks);
    - a decode step costs a fixed 16.6 ms (measured per-step overhead on one H200, DESIGN §10) plus its
      live rows' FLOPs at 30% of 989 TFLOP/s per GPU; prefill and training run at 40%, training at 3x
      the forward FLOPs; every token is costed at the context budget/2;
    - a resumed response re-prefills its prompt and tokens so far (what our engine does);
    - response lengths are the benchmark's shape scaled to the budget: geometric with mean budget/6,
      cut at the budget; weight sync and scoring are free.
    Synchronous: generate (every row to its end) then train. Partial: admit prompts_per_step groups,
    generate at most `chunk` tokens per row, train the finished groups. Asynchronous + partial: the two overlap, so a step takes the longer one.
    """
    recipe = load_recipe(recipe_path, [])
    shape, _ = model_shape(recipe)
    r, res = recipe.rollout, recipe.resources
    rollout_gpus = r.num_workers * int(max(1, res.rollout.gpus))
    train_gpus = recipe.trainer.num_ranks * int(max(1, res.trainer.gpus))
    flops = shape.flops_per_token(budget // 2)
    decode_per_token = flops / (rollout_gpus * 0.3 * 989e12)
    forward_per_token = flops / (rollout_gpus * 0.4 * 989e12)
    train_per_token = 3 * flops / (train_gpus * 0.4 * 989e12)
    rng = random.Random(seed)
    length = lambda: min(budget, 1 + int(rng.expovariate(6 / budget)))
    groups, n = recipe.data.prompts_per_step, r.n_samples

    sync_gen = sync_train = sync_tokens = 0.0
    for _ in range(steps):
        lengths = [length() for _ in range(groups * n)]
        sync_gen += max(lengths) * 0.0166 + sum(lengths) * decode_per_token
        sync_train += sum(lengths) * train_per_token
        sync_tokens += sum(lengths)
    flight, part_gen, part_train, async_wall, part_tokens = [], 0.0, 0.0, 0.0, 0
    for _ in range(steps):
        flight += [[[length(), 0] for _ in range(n)] for _ in range(groups)]  # [length, decoded] per sample
        decoded = resumed = longest = 0
        for g in flight:
            for s in g:
                step_tokens = min(chunk, s[0] - s[1])
                resumed += s[1] if step_tokens else 0
                decoded, longest, s[1] = decoded + step_tokens, max(longest, step_tokens), s[1] + step_tokens
        gen = longest * 0.0166 + decoded * decode_per_token + resumed * forward_per_token
        finished = sum(s[0] for g in flight if all(s[0] == s[1] for s in g) for s in g)
        flight = [g for g in flight if not all(s[0] == s[1] for s in g)]
        part_gen, part_train, part_tokens = part_gen + gen, part_train + finished * train_per_token, part_tokens + finished
        async_wall += max(gen, finished * train_per_token)
    sync_wall, part_wall = sync_gen + sync_train, part_gen + part_train
    out = {"sim_rollout_gpus": rollout_gpus, "sim_train_gpus": train_gpus, "sim_budget": budget, "sim_chunk": chunk,
           "sim_synchronous_step_s": round(sync_wall / steps, 1), "sim_partial_step_s": round(part_wall / steps, 1),
           "sim_async_partial_step_s": round(async_wall / steps, 1)}
    rates = {"synchronous": sync_tokens / sync_wall, "partial": part_tokens / part_wall, "async_partial": part_tokens / async_wall}
    return {**out, **{f"sim_{k}_vs_synchronous": round(v / rates["synchronous"], 2) for k, v in rates.items() if k != "synchronous"}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--budget", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--stop-prob", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per actor (run.threads)")
    ap.add_argument("--skip", type=int, default=None, help="first steps left out (default: budget/chunk + 1)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each mode, interleaved; figures are medians")
    args = ap.parse_args()
    chunks = math.ceil(args.budget / args.chunk)
    args.skip = chunks + 1 if args.skip is None else args.skip
    modes = {"synchronous": [],
             "partial": [f"rollout.partial_tokens={args.chunk}", f"rollout.max_staleness={chunks - 1}"],
             "async_partial": [f"rollout.partial_tokens={args.chunk}", "rollout.overlap=true",
                               f"rollout.max_staleness={chunks}"]}
    root = tempfile.mkdtemp(prefix="async-throughput-")
    runs = [{name: measure(mode, args, os.path.join(root, f"{name}-{i}")) for name, mode in modes.items()}
            for i in range(args.repeats)]
    median = lambda values: round(statistics.median(values), 2)
    figures = {name: {k: median(run[name][k] for run in runs) for k in runs[0][name]} for name in modes}
    line = {"budget": args.budget, "chunk": args.chunk, "steps": args.steps, "measured_steps": args.steps - args.skip - 1,
            "threads_per_actor": args.threads, "cpus": os.cpu_count(), "repeats": args.repeats,
            **{f"{name}_{k}": v for name, f in figures.items() for k, v in f.items()},
            **{f"{name}_vs_synchronous": median(run[name]["trained_tokens_per_s"] / run["synchronous"]["trained_tokens_per_s"]
                                                for run in runs) for name in modes if name != "synchronous"},
            "vs_synchronous_each_repeat": {name: [round(run[name]["trained_tokens_per_s"] /
                                                        run["synchronous"]["trained_tokens_per_s"], 2) for run in runs]
                                           for name in modes if name != "synchronous"},
            **simulate(os.path.join(REPO, "recipes/m1-40k.yaml"), budget=40_000, chunk=8_000)}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
