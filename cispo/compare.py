"""`cispo compare SPEC [--out DIR]`: one recipe trained under several policy losses and seeds, then
steps-to-target, final accuracy and a clip-range sweep set beside the papers' claims.

A spec (recipes/compare/*.yaml) names a base recipe, overrides shared by every run, the seeds, and
the variants as override lists. Every run of a seed differs from the others only in its variant's
overrides: the data order, rollout seeds and minibatch order are derived from `run.seed` and the step
(cispo.data.derive_seed), and all of a seed's runs start from one shared warm start (the recipe's SFT
run once per seed with `run.max_steps=0`, then `model.path=.../final sft.steps=0`).

Each run is its own `cispo train` process (its own local Ray), `parallel` at a time (cispo.jobs: a
finished run is skipped, an interrupted one resumed). The runs are read, aggregated over seeds and
drawn through cispo.report.

The claims: MiniMax-M1 (arXiv 2506.13585) §3.1 and Fig. 2: CISPO matched DAPO's performance in half
the training steps and beat GRPO (Qwen2.5-32B, AIME 2024). ScaleRL (arXiv 2510.13786): CISPO is less
sensitive to its IS-weight cap than DAPO to its clip range.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cispo.config import RecipeError, load_recipe
from cispo.jobs import Job, run_jobs
from cispo.report import Configuration, Run, plot, table_rows


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

def plan(spec: CompareSpec, out: Path) -> list[Job]:
    """The warm start of each seed (when the base recipe has one), then the main variants seed by seed,
    then the other variants: if the budget runs out, what is done is whole seeds of the main table."""
    warm_needed = load_recipe(spec.base, spec.overrides).sft.steps > 0
    warm = {}
    for seed in spec.seeds:
        warm_dir = out / "warm-start" / f"seed-{seed}"
        if warm_needed:
            warm[seed] = Job(f"warm-start/seed-{seed}", warm_dir, spec.base, spec.overrides + [
                f"run.seed={seed}", f"model.seed={seed}", "run.max_steps=0", f"run.dir={warm_dir}"])
    jobs = list(warm.values())
    for names in (spec.main, [n for n in spec.variants if n not in spec.main]):
        for seed in spec.seeds:
            for name in names:
                run_dir, start = out / name / f"seed-{seed}", warm.get(seed)
                from_warm = [f"model.path={start.run_dir / 'final'}", "sft.steps=0"] if start else []
                jobs.append(Job(f"{name}/seed-{seed}", run_dir, spec.base, spec.overrides + spec.variants[name] + [
                    f"run.seed={seed}", f"model.seed={seed}", *from_warm, f"run.dir={run_dir}"], start))
    return jobs


# ---------------------------------------------------------------- the figures

def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first step at which eval accuracy reaches `target` (>=), from (step, accuracy) points in
    step order (step 0: before RL); None if it never does."""
    return next((step for step, accuracy in curve if accuracy >= target), None)


def collect(spec: CompareSpec, out: Path) -> tuple[dict[str, Configuration], list[str]]:
    """Each variant's finished runs (those with summary.json) as a cispo.report Configuration named by the
    variant, and the unfinished runs' names."""
    results, unfinished = {}, []
    for name in spec.variants:
        dirs = {f"{name}/seed-{seed}": out / name / f"seed-{seed}" for seed in spec.seeds}
        unfinished += [run for run, d in dirs.items() if not (d / "summary.json").is_file()]
        results[name] = Configuration(name, [Run.load(d) for d in dirs.values() if (d / "summary.json").is_file()])
    return results, unfinished


def finals(c: Configuration) -> list[float]:
    """Each run's last held-out accuracy."""
    return [run.series("eval_accuracy")[-1][1] for run in c.runs]


def median_steps(c: Configuration, target: float) -> float | None:
    """The median steps-to-target over seeds, "not reached" counted as later than any step; None if the
    median run did not reach it (or there is no run)."""
    ordered = sorted((steps_to_target(r.series("eval_accuracy"), target) for r in c.runs),
                     key=lambda s: float("inf") if s is None else s)
    if not ordered:
        return None
    lo, hi = ordered[(len(ordered) - 1) // 2], ordered[len(ordered) // 2]
    return None if lo is None or hi is None else (lo + hi) / 2


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "no finished run"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f} ({min(values):.3f}–{max(values):.3f})"


def _median_text(c: Configuration, target: float) -> str:
    median = median_steps(c, target)
    return "–" if not c.runs else "not reached" if median is None else f"{median:g}"


def render(spec: CompareSpec, results: dict[str, Configuration], figure: str | None, unfinished=()) -> str:
    """The markdown report: target, steps-to-target and final accuracy per main variant, the sweeps,
    and the papers' claims beside ours."""
    if not results[spec.target].runs:
        return f"# Comparison: {spec.base}\n\nNo finished {spec.target} run, so there is no target yet.\n"
    target = statistics.mean(finals(results[spec.target]))
    max_steps = load_recipe(spec.base, spec.overrides).run.max_steps
    lines = [f"# Comparison: {spec.base}", "",
             f"Every run: `cispo train {spec.base} {' '.join(spec.overrides)}` plus its variant's overrides; "
             f"seeds {', '.join(map(str, spec.seeds))}; {max_steps} RL steps. "
             f"Target: {spec.target}'s final mean eval accuracy, **{target:.3f}**. "
             "Steps-to-target: the first evaluated step at which a run's eval accuracy reaches it "
             "(step 0 is the shared warm start). Accuracy: mean ± sd over seeds (min–max). "
             "Clipped: the mean share of tokens whose IS weight was clipped. Wall: mean seconds per run.", ""]
    if figure:
        lines += [f"![eval accuracy against step]({figure})", ""]

    def table(names: list[str]) -> list[str]:
        out = ["| variant | overrides | steps-to-target per seed | median | final eval accuracy | clipped | wall s |",
               "|---|---|---|---|---|---|---|"]
        for name, row in zip(names, table_rows([results[n] for n in names])):
            steps = [steps_to_target(r.series("eval_accuracy"), target) for r in results[name].runs]
            out.append(f"| {name} | `{' '.join(spec.variants[name])}` | "
                       f"{', '.join('not reached' if s is None else str(s) for s in steps) or '–'} | "
                       f"{_median_text(results[name], target)} | {_mean_spread(finals(results[name]))} | "
                       f"{row['clip_fraction_mean'][0]:.4f} | {row['wall_s'][0]:.0f} |")
        return out

    lines += table(spec.main)
    if unfinished:
        lines += ["", f"Not finished (left out of every table): {', '.join(unfinished)}."]
    for title, names in spec.sweeps.items():
        lines += ["", f"## {title}", ""] + table(names)
        if (spread := _sweep_range(results, names)) is not None:
            lines += ["", f"Range of the means across the sweep: **{spread:.3f}**."]
    lines += ["", "## The papers' claims beside ours", "", "| claim | paper | here |", "|---|---|---|"]
    lines += _claims(spec, results, target)
    return "\n".join(lines) + "\n"


def _sweep_range(results: dict[str, Configuration], names: list[str]) -> float | None:
    means = [statistics.mean(finals(results[n])) for n in names if results[n].runs]
    return max(means) - min(means) if len(means) > 1 else None


def _claims(spec: CompareSpec, results: dict[str, Configuration], target: float) -> list[str]:
    """Rows for the claims whose losses the main variants have (the first main variant finished with each
    `algorithm.name`) and for its sweeps."""
    by_loss = {}
    for name in spec.main:
        if results[name].runs:
            by_loss.setdefault(results[name].runs[0].recipe.algorithm.name, results[name])
    rows, cispo, dapo, grpo = [], by_loss.get("cispo"), by_loss.get("dapo"), by_loss.get("grpo")
    if cispo and dapo:
        c, d = median_steps(cispo, target), median_steps(dapo, target)
        ours = (f"median steps-to-target: CISPO ({cispo.label}) {_median_text(cispo, target)}, DAPO ({dapo.label}) "
                f"{_median_text(dapo, target)}")
        if c is not None and d:
            ours += f"; ratio {c / d:.2f}, so {'it holds' if c <= d / 2 else 'it does not hold'} here"
        rows.append("| CISPO reaches DAPO's final accuracy in half DAPO's steps | MiniMax-M1 §3.1, Fig. 2: yes "
                    f"(Qwen2.5-32B base, AIME 2024) | {ours} |")
    if cispo and grpo:
        a, b = finals(cispo), finals(grpo)
        diff = statistics.mean(a) - statistics.mean(b)
        overlap = "; the seeds' ranges overlap" if min(a) <= max(b) and min(b) <= max(a) else ""
        rows.append(f"| CISPO beats GRPO | MiniMax-M1 Fig. 2: yes | {'CISPO' if diff > 0 else 'GRPO'} ahead by "
                    f"{abs(diff):.3f} in mean final accuracy{overlap} |")
    ranges = [f"{title}: {spread:.3f}" for title, names in spec.sweeps.items()
              if (spread := _sweep_range(results, names)) is not None]
    if len(ranges) > 1:
        rows.append("| CISPO is less sensitive to its cap than DAPO to its clip range | ScaleRL (arXiv 2510.13786): "
                    f"yes | range of the mean final accuracy across each sweep: {'; '.join(ranges)} |")
    return rows


def compare(spec_path: str | Path, out: str | Path | None = None) -> tuple[bool, Path]:
    """Run the spec's unfinished runs, then write OUT/compare.md and OUT/accuracy.png (the main variants'
    eval accuracy and clip fraction, drawn by cispo.report) and print the markdown. Returns (every run finished, the markdown's path)."""
    spec = load_spec(spec_path)
    out = Path(out or spec.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok = run_jobs(plan(spec, out), spec.parallel)
    print(f"runs took {time.perf_counter() - t0:.0f}s", flush=True)
    results, unfinished = collect(spec, out)
    figure = None
    if main := [results[n] for n in spec.main if results[n].runs]:
        plot(main, out / "accuracy.png", panels=("eval_accuracy", "clip_fraction"))
        figure = "accuracy.png"
    report = render(spec, results, figure, unfinished)
    (out / "compare.md").write_text(report)
    print(report, flush=True)
    return ok, out / "compare.md"
