"""`cispo compare SPEC [--out DIR]`: one recipe trained under several policy losses and seeds, then
steps-to-target, final accuracy and a clip-range sweep set beside the papers' claims.

A spec (recipes/compare/*.yaml) names a base recipe, overrides shared by every run, the seeds, and
the variants as override lists. Every run of a seed differs from the others only in its variant's
overrides: the data order, rollout seeds and minibatch order are derived from `run.seed` and the step
(cispo.data.derive_seed), and all of a seed's runs start from one shared warm start (the recipe's SFT
run once per seed with `run.max_steps=0`, then `model.path=.../final sft.steps=0`).

Each run is its own `cispo train` process (its own local Ray), `parallel` at a time. A run dir holding
summary.json is finished and skipped; one with a checkpoint is resumed; any other is started afresh.
So a crash or Ctrl-C loses at most the runs in flight since their last checkpoint.

The claims: MiniMax-M1 (arXiv 2506.13585) §3.1 and Fig. 2: CISPO matched DAPO's performance in half
the training steps and beat GRPO (Qwen2.5-32B, AIME 2024). ScaleRL (arXiv 2510.13786): CISPO is less
sensitive to its IS-weight cap than DAPO to its clip range.
"""
from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cispo import checkpoint
from cispo.config import RecipeError, load_recipe
from cispo.report import Run


class CompareSpec(BaseModel):
    """A comparison: every run is `cispo train BASE *overrides *variants[name] run.seed=S model.seed=S`."""
    model_config = ConfigDict(extra="forbid")

    base: str = Field(description="the recipe every run starts from")
    overrides: list[str] = Field(default_factory=list, description="key=value for every run (budget, eval)")
    seeds: list[int] = Field(min_length=1, description="each variant runs once per seed (run.seed and model.seed)")
    variants: dict[str, list[str]] = Field(min_length=1, description="name -> the overrides that make it")
    main: list[str] = Field(min_length=1, description="the variants of the steps-to-target table and the figure")
    target: str = Field(description="the variant whose final mean eval accuracy is the target")
    sweeps: dict[str, list[str]] = Field(default_factory=dict, description="title -> variants of one sensitivity sweep")
    parallel: int = Field(2, ge=1, description="runs at once")
    out: str = Field(description="the output dir, unless --out is given")

    @model_validator(mode="after")
    def _names_defined(self):
        named = [("main", n) for n in self.main] + [("target", self.target)]
        named += [(f"sweeps[{title!r}]", n) for title, names in self.sweeps.items() for n in names]
        for where, name in named:
            if name not in self.variants:
                raise ValueError(f"{where}: no variant named {name!r} (variants: {', '.join(self.variants)})")
        if self.target not in self.main:
            raise ValueError(f"target {self.target!r} is not one of main: {', '.join(self.main)}")
        return self


def load_spec(path: str | Path) -> CompareSpec:
    """Read and check a spec, and every run's recipe (base + overrides + variant), before any run
    starts: a typo fails in a second, not after an hour of runs. Errors are one-line RecipeErrors."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"compare spec not found: {path}")
    try:
        spec = CompareSpec.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: malformed YAML: {getattr(exc, 'problem', exc)}") from None
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"])
        raise RecipeError(f"{path}: {where + ': ' if where else ''}{e['msg']}") from None
    for name, variant in spec.variants.items():
        try:
            load_recipe(spec.base, spec.overrides + variant)
        except RecipeError as err:
            raise RecipeError(f"{path}: variant {name!r}: {err}") from None
    return spec


# ---------------------------------------------------------------- the runs

@dataclass
class Job:
    """One `cispo train` process: its run dir and overrides, and the job that must finish first."""
    name: str
    run_dir: Path
    overrides: list[str]
    after: Job | None = None
    rc: int | None = None  # None: not run yet; 0: finished (or found finished); -1: skipped; else failed

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


def plan(spec: CompareSpec, out: Path) -> list[Job]:
    """The warm start of each seed (when the base recipe has one), then the main variants seed by seed,
    then the other variants: if the budget runs out, what is done is whole seeds of the main table."""
    warm_needed = load_recipe(spec.base, spec.overrides).sft.steps > 0
    warm = {}
    for seed in spec.seeds:
        warm_dir = out / "warm-start" / f"seed-{seed}"
        if warm_needed:
            warm[seed] = Job(f"warm-start/seed-{seed}", warm_dir,
                             [f"run.seed={seed}", f"model.seed={seed}", "run.max_steps=0", f"run.dir={warm_dir}"])
    jobs = list(warm.values())
    for names in (spec.main, [n for n in spec.variants if n not in spec.main]):
        for seed in spec.seeds:
            for name in names:
                run_dir, start = out / name / f"seed-{seed}", warm.get(seed)
                from_warm = [f"model.path={start.run_dir / 'final'}", "sft.steps=0"] if start else []
                jobs.append(Job(f"{name}/seed-{seed}", run_dir, spec.variants[name] + [
                    f"run.seed={seed}", f"model.seed={seed}", *from_warm, f"run.dir={run_dir}"], start))
    return jobs


def _launch(spec: CompareSpec, job: Job) -> subprocess.Popen:
    overrides = spec.overrides + job.overrides
    if checkpoint.latest(job.run_dir) is not None:
        overrides.append("run.resume=true")
    elif job.run_dir.exists():  # died before its first checkpoint: nothing in it to keep
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with job.log.open("a") as log:
        # Its own session: a Ctrl-C reaches only this runner, which passes each run one SIGTERM (a run
        # stops at its next step boundary with a checkpoint; a second signal would stop it mid-step).
        return subprocess.Popen([sys.executable, "-m", "cispo.cli", "train", spec.base, *overrides],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_jobs(spec: CompareSpec, jobs: list[Job]) -> bool:
    """Run the unfinished jobs, `spec.parallel` at a time, each after the job it needs. Returns False
    if any failed (the others still run; what needs a failed job is skipped). SIGINT/SIGTERM stop the
    runs in flight with a checkpoint and raise KeyboardInterrupt."""
    pending = [j for j in jobs if not j.finished]
    for j in jobs:
        if j.finished:
            j.rc = 0
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs already finished", flush=True)
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM too: stop cleanly
    try:
        while pending or running:
            for pid, (job, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    job.rc = proc.returncode if proc.returncode or job.finished else 1
                    del running[pid]
                    state = "done" if job.rc == 0 else f"FAILED (exit {proc.returncode}, log {job.log})"
                    print(f"{job.name}: {state} in {time.perf_counter() - t0:.0f}s", flush=True)
            for job in [j for j in pending if j.after is not None and j.after.rc not in (None, 0)]:
                pending.remove(job)
                job.rc = -1
                print(f"{job.name}: skipped, {job.after.name} failed", flush=True)
            ready = [j for j in pending if j.after is None or j.after.rc == 0]
            while ready and len(running) < spec.parallel:
                job = ready.pop(0)
                pending.remove(job)
                print(f"{job.name}: started (log {job.log})", flush=True)
                proc = _launch(spec, job)
                running[proc.pid] = (job, proc, time.perf_counter())
            time.sleep(0.5)
    except KeyboardInterrupt:
        for job, proc, _ in running.values():
            proc.send_signal(signal.SIGTERM)
        for job, proc, _ in running.values():
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return all(j.rc == 0 for j in jobs)


# ---------------------------------------------------------------- the figures

def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step at which eval accuracy reaches `target` (>=), from (step, accuracy) points in
    step order (step 0: before RL); None if it never does."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


@dataclass
class RunResult:
    curve: list[tuple[int, float]]  # (step, eval accuracy); step 0 is before RL
    wall_s: float
    clip_fraction: float            # mean over steps of the share of tokens whose IS weight was clipped


def read_run(run_dir: Path) -> RunResult:
    """A finished run's eval curve (step 0 from summary.json, then each evaluated step of metrics.jsonl),
    wall time and mean clip fraction, read through cispo.report's Run."""
    run = Run.load(run_dir)
    clipped = [value for _, value in run.series("clip_fraction")]
    return RunResult(run.series("eval_accuracy"), run.summary["wall_s"], statistics.mean(clipped) if clipped else 0.0)


@dataclass
class VariantResult:
    runs: dict[int, RunResult]  # seed -> its finished run
    missing: list[int]          # seeds without a finished run

    @property
    def finals(self) -> list[float]:
        return [r.curve[-1][1] for r in self.runs.values()]

    def steps(self, target: float) -> list[int | None]:
        return [steps_to_target(r.curve, target) for r in self.runs.values()]

    def median_steps(self, target: float) -> float | None:
        """The median steps-to-target over seeds, "not reached" counted as later than any step; None if
        the median run did not reach it."""
        ordered = sorted(self.steps(target), key=lambda s: float("inf") if s is None else s)
        if not ordered:
            return None
        lo, hi = ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]
        return None if lo is None or hi is None else (lo + hi) / 2


def collect(spec: CompareSpec, out: Path) -> dict[str, VariantResult]:
    results = {}
    for name in spec.variants:
        dirs = {seed: out / name / f"seed-{seed}" for seed in spec.seeds}
        done = {seed: d for seed, d in dirs.items() if (d / "summary.json").is_file()}
        results[name] = VariantResult({seed: read_run(d) for seed, d in done.items()},
                                      [seed for seed in spec.seeds if seed not in done])
    return results


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "no finished run"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f})"


def _steps_text(steps: list[int | None]) -> str:
    return ", ".join("not reached" if s is None else str(s) for s in steps) or "–"


def _median_text(r: VariantResult, target: float) -> str:
    median = r.median_steps(target)
    return "–" if not r.runs else "not reached" if median is None else f"{median:g}"


def _overlap(a: list[float], b: list[float]) -> bool:
    return bool(a and b) and min(a) <= max(b) and min(b) <= max(a)


def render(spec: CompareSpec, results: dict[str, VariantResult], figure: str | None) -> str:
    """The markdown report: target, steps-to-target and final accuracy per main variant, the sweeps,
    and the papers' claims beside ours."""
    target_finals = results[spec.target].finals
    if not target_finals:
        return f"# Comparison: {spec.base}\n\nNo finished {spec.target} run, so there is no target yet.\n"
    target = statistics.mean(target_finals)
    max_steps = load_recipe(spec.base, spec.overrides).run.max_steps
    lines = [f"# Comparison: {spec.base}", "",
             f"Every run: `cispo train {spec.base} {' '.join(spec.overrides)}` plus its variant's overrides; "
             f"seeds {', '.join(map(str, spec.seeds))}; {max_steps} RL steps. "
             f"Target: {spec.target}'s final mean eval accuracy, **{target:.3f}**. "
             "Steps-to-target: the first evaluated step at which a run's eval accuracy reaches it "
             "(step 0 is the shared warm start). Accuracy: mean ± sd over seeds (min–max). "
             "Clipped: the mean share of tokens whose IS weight was clipped. Wall: median seconds per run.", ""]
    if figure:
        lines += [f"![eval accuracy against step]({figure})", ""]

    def table(names: list[str]) -> list[str]:
        out = ["| variant | overrides | steps-to-target per seed | median | final eval accuracy | clipped | wall s |",
               "|---|---|---|---|---|---|---|"]
        for name in names:
            r = results[name]
            clipped = statistics.mean(x.clip_fraction for x in r.runs.values()) if r.runs else float("nan")
            wall = statistics.median(x.wall_s for x in r.runs.values()) if r.runs else float("nan")
            out.append(f"| {name} | `{' '.join(spec.variants[name])}` | {_steps_text(r.steps(target))} | "
                       f"{_median_text(r, target)} | {_mean_spread(r.finals)} | {clipped:.4f} | {wall:.0f} |")
        return out

    lines += table(spec.main)
    missing = [f"{n}/seed-{s}" for n, r in results.items() for s in r.missing]
    if missing:
        lines += ["", f"Not finished (left out of every table): {', '.join(missing)}."]
    for title, names in spec.sweeps.items():
        lines += ["", f"## {title}", ""] + table(names)
        means = [statistics.mean(results[n].finals) for n in names if results[n].finals]
        if len(means) > 1:
            lines += ["", f"Range of the means across the sweep: **{max(means) - min(means):.3f}**."]
    lines += ["", "## The papers' claims beside ours", "", "| claim | paper | here |", "|---|---|---|"]
    lines += _claims(spec, results, target)
    return "\n".join(lines) + "\n"


def _claims(spec: CompareSpec, results: dict[str, VariantResult], target: float) -> list[str]:
    """Rows for the claims whose variants the spec has (named cispo, dapo, grpo) and for its two sweeps."""
    rows = []
    cispo, dapo, grpo = (results.get(n) for n in ("cispo", "dapo", "grpo"))
    if cispo and dapo and cispo.runs and dapo.runs:
        c, d = cispo.median_steps(target), dapo.median_steps(target)
        ours = f"median steps-to-target: CISPO {_median_text(cispo, target)}, DAPO {_median_text(dapo, target)}"
        if c is not None and d:
            ours += f"; ratio {c / d:.2f}, so {'it holds' if c <= d / 2 else 'it does not hold'} here"
        rows.append("| CISPO reaches DAPO's final accuracy in half DAPO's steps | MiniMax-M1 §3.1, Fig. 2: yes "
                    f"(Qwen2.5-32B base, AIME 2024) | {ours} |")
    if cispo and grpo and cispo.finals and grpo.finals:
        diff = statistics.mean(cispo.finals) - statistics.mean(grpo.finals)
        overlap = "; the seeds' ranges overlap" if _overlap(cispo.finals, grpo.finals) else ""
        rows.append(f"| CISPO beats GRPO | MiniMax-M1 Fig. 2: yes | {'CISPO' if diff > 0 else 'GRPO'} ahead by "
                    f"{abs(diff):.3f} in mean final accuracy{overlap} |")
    ranges = []
    for title, names in spec.sweeps.items():
        means = [statistics.mean(results[n].finals) for n in names if results[n].finals]
        if len(means) > 1:
            ranges.append(f"{title}: {max(means) - min(means):.3f}")
    if len(ranges) > 1:
        rows.append("| CISPO is less sensitive to its cap than DAPO to its clip range | ScaleRL (arXiv 2510.13786): "
                    f"yes | range of the mean final accuracy across each sweep: {'; '.join(ranges)} |")
    return rows


def plot(spec: CompareSpec, results: dict[str, VariantResult], path: Path) -> None:
    """Eval accuracy against step: one line per variant (mean over seeds) in a min–max band; one panel
    for the main variants and one per sweep; the target dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("main variants", spec.main)] + list(spec.sweeps.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    finals, colors = results[spec.target].finals, plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            curves = [dict(r.curve) for r in results[name].runs.values()]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            at = [[c[s] for c in curves] for s in steps]
            color = colors[list(spec.variants).index(name) % len(colors)]  # one colour per variant in every panel
            ax.plot(steps, [statistics.mean(v) for v in at], color=color, label=f"{name} ({len(curves)} seeds)")
            ax.fill_between(steps, [min(v) for v in at], [max(v) for v in at], color=color, alpha=0.2)
        if finals:
            ax.axhline(statistics.mean(finals), color="gray", linestyle="--", linewidth=1,
                       label=f"target ({spec.target} final)")
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.set_ylabel("held-out eval accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def compare(spec_path: str | Path, out: str | Path | None = None) -> tuple[bool, Path]:
    """Run the spec's unfinished runs, then write OUT/compare.md and OUT/accuracy.png and print the
    markdown. Returns (every run finished, the markdown's path)."""
    spec = load_spec(spec_path)
    out = Path(out or spec.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = run_jobs(spec, plan(spec, out))
    print(f"runs took {time.perf_counter() - t0:.0f}s", flush=True)
    results = collect(spec, out)
    figure = None
    if any(r.runs for r in results.values()):
        plot(spec, results, out / "accuracy.png")
        figure = "accuracy.png"
    report = render(spec, results, figure)
    (out / "compare.md").write_text(report)
    print(report, flush=True)
    return ok, out / "compare.md"
