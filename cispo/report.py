"""`cispo report RUN_DIR [RUN_DIR ...]`: runs' metrics.jsonl drawn against step, and one table of them.

Runs whose resolved recipes (config.yaml) differ only in `RUN_KEYS` are seeds of one configuration:
its curves are the mean over seeds with a min–max band, its table cells mean ± sample standard
deviation. Each configuration is named by its recipe file and the keys whose values differ between
the configurations, e.g. `tiny-countdown algorithm.name=dapo ...`.

For other code: `report(run_dirs, out_dir)` writes the figure and table and returns them with the
numbers; `group_runs(run_dirs)` gives the configurations, whose `curve(key)` is what a figure draws;
`plot(configurations, path, panels)` draws a chosen subset of `PANELS`.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cispo.config import Recipe, RecipeError, load_recipe, saved_origin
from cispo.metrics import read_metrics

# Keys that name a run rather than what it computes: runs that differ in nothing else are seeds.
RUN_KEYS = ("run.dir", "run.seed", "run.resume")

# The figure's panels: name -> (y-axis label, metric keys of metrics.jsonl; the first solid, the second dashed).
PANELS = {
    "reward": ("mean reward", ("reward_mean",)),
    "eval_accuracy": ("held-out accuracy (greedy)", ("eval_accuracy",)),
    "response_length": ("response tokens (— mean, -- p99)", ("response_length_mean", "response_length_p99")),
    "clip_fraction": ("share of tokens with r clipped", ("clip_fraction",)),
    "is_weight": ("IS weight r (— mean, -- max)", ("is_weight_mean", "is_weight_max")),
    "entropy": ("entropy (nats per token)", ("entropy",)),
    "fork_tokens": ("share PPO-clip zeroes, CISPO keeps", ("ppo_zeroed_fraction",)),
}


@dataclass
class Run:
    """One run dir: its resolved recipe, the recipe file it came from (None if unknown), its metrics rows
    (oldest first) and summary.json ({} until the run finishes)."""
    dir: Path
    recipe: Recipe
    origin: Path | None
    rows: list[dict]
    summary: dict

    @classmethod
    def load(cls, run_dir: str | Path) -> Run:
        """Raises RecipeError, one line naming the path, for a missing dir, metrics.jsonl or config.yaml,
        a metrics file without rows, or a malformed row or summary."""
        run_dir = Path(run_dir)
        rows = read_metrics(run_dir)
        if not rows:
            raise RecipeError(f"{run_dir / 'metrics.jsonl'} holds no rows yet (a run writes one per RL step)")
        config = run_dir / "config.yaml"
        if not config.is_file():
            raise RecipeError(f"run dir {run_dir} has no config.yaml (the resolved recipe a run saves)")
        summary = {}
        if (run_dir / "summary.json").is_file():
            try:
                summary = json.loads((run_dir / "summary.json").read_text())
            except ValueError as exc:
                raise RecipeError(f"{run_dir / 'summary.json'}: malformed ({exc})") from None
        return cls(run_dir, load_recipe(config), saved_origin(config), rows, summary)

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of each row that logged `key`. Held-out accuracy is logged on eval steps only, and
        starts with the accuracy before RL (summary.json) as step 0."""
        points = [(r["step"], r[key]) for r in self.rows if r.get(key) is not None]
        if key == "eval_accuracy" and "eval_accuracy_start" in self.summary:
            points.insert(0, (0, self.summary["eval_accuracy_start"]))
        return points


@dataclass
class Configuration:
    """Runs that differ only in RUN_KEYS (its seeds), named by `label`."""
    label: str
    runs: list[Run]

    def curve(self, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
        """(steps, mean, min, max) of metric `key` over the runs, at the steps every run logged it."""
        series = [dict(run.series(key)) for run in self.runs]
        steps = sorted(set.intersection(*(set(s) for s in series)))
        values = [[s[step] for s in series] for step in steps]
        return steps, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]

    def fork_tokens(self, k: int = 10) -> list[tuple[str, int]]:
        """The `k` tokens PPO-clip would have zeroed (and CISPO kept) most often, as (text, count) summed
        over steps and runs. Each row names its step's top 10 only, so rarer tokens can be undercounted."""
        counts = Counter()
        for run in self.runs:
            for row in run.rows:
                counts.update({(i, text): n for i, text, n in row.get("ppo_zeroed_tokens", [])})
        return [(text, n) for (_, text), n in counts.most_common(k)]


def _flat(tree, prefix: str = "") -> dict:
    """A recipe's values by dotted key (list items by index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) and any(
        isinstance(v, dict) for v in tree) else None
    if items is None:
        return {prefix.rstrip("."): tree}
    return {k: v for key, value in items for k, v in _flat(value, f"{prefix}{key}.").items()}


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def group_runs(run_dirs: list[str | Path]) -> list[Configuration]:
    """The runs (see `Run.load` for errors) grouped into configurations, in the order first given.

    A configuration's label is its recipe file's stem followed by `key=value` for every recipe key whose
    value differs between the configurations (none with one configuration); a run whose recipe file is
    unknown is named by the keys alone, or its dir when nothing differs."""
    groups: dict[str, list[Run]] = {}
    values: dict[str, dict] = {}
    for run in map(Run.load, run_dirs):
        flat = {k: v for k, v in _flat(run.recipe.model_dump(mode="json")).items() if k not in RUN_KEYS}
        identity = json.dumps(flat, sort_keys=True)
        groups.setdefault(identity, []).append(run)
        values[identity] = flat
    keys = list(dict.fromkeys(k for flat in values.values() for k in flat))
    differing = [k for k in keys if len({_show(flat.get(k)) for flat in values.values()}) > 1]
    configurations = []
    for identity, runs in groups.items():
        origin = runs[0].origin
        words = ([origin.stem] if origin else []) + [f"{k}={_show(values[identity].get(k))}" for k in differing]
        configurations.append(Configuration(" ".join(words) or runs[0].dir.name, runs))
    return configurations


def _last(key: str):
    return lambda run: next((r[key] for r in reversed(run.rows) if r.get(key) is not None), math.nan)


def _over(key: str, reduce):
    return lambda run: reduce(v) if (v := [r[key] for r in run.rows if r.get(key) is not None]) else math.nan


def _accuracy(pick):
    return lambda run: pick(v) if (v := [a for _, a in run.series("eval_accuracy")]) else math.nan


# The table's columns: (key, header, format, figure of one run).
COLUMNS = [
    ("steps", "steps", ".0f", lambda run: run.rows[-1]["step"]),
    ("eval_first", "eval first", ".3f", _accuracy(lambda v: v[0])),
    ("eval_last", "eval last", ".3f", _accuracy(lambda v: v[-1])),
    ("eval_best", "eval best", ".3f", _accuracy(max)),
    ("reward_final", "reward final", ".3f", _last("reward_mean")),
    ("length_mean_final", "length mean final", ".1f", _last("response_length_mean")),
    ("length_p99_final", "length p99 final", ".1f", _last("response_length_p99")),
    ("clip_fraction_mean", "clip fraction mean", ".4f", _over("clip_fraction", statistics.fmean)),
    ("fork_share_mean", "PPO-zeroed share mean", ".4f", _over("ppo_zeroed_fraction", statistics.fmean)),
    ("is_weight_max", "IS weight max", ".2f", _over("is_weight_max", max)),
    ("entropy_final", "entropy final", ".3f", _last("entropy")),
    ("rl_s", "RL steps s", ".0f", _over("time_step_s", sum)),
    ("wall_s", "wall s", ".0f", lambda run: run.summary.get("wall_s", math.nan)),
]


def table_rows(configurations: list[Configuration]) -> list[dict]:
    """One dict per configuration: `configuration` (its label), `runs`, and for each COLUMNS key
    (mean, sample standard deviation over its runs; None with one run); NaN where no run logged it."""
    rows = []
    for c in configurations:
        row = {"configuration": c.label, "runs": len(c.runs)}
        for key, _, _, figure in COLUMNS:
            v = [float(figure(run)) for run in c.runs]
            row[key] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None)
        rows.append(row)
    return rows


def render(rows: list[dict], forks: dict[str, list[tuple[str, int]]]) -> str:
    """The table as Markdown, then each configuration's most often PPO-zeroed tokens."""
    cell = lambda m, s, fmt: "–" if math.isnan(m) else f"{m:{fmt}}" + ("" if s is None else f" ± {s:{fmt}}")
    lines = ["| configuration | runs | " + " | ".join(h for _, h, _, _ in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    lines += [f"| {r['configuration']} | {r['runs']} | " + " | ".join(cell(*r[k], fmt) for k, _, fmt, _ in COLUMNS)
              + " |" for r in rows]
    lines += ["", "Mean ± sample standard deviation over each configuration's runs (seeds). eval: held-out "
              "accuracy, first = before RL; PPO-zeroed share: tokens whose gradient PPO-clip would have zeroed "
              "(M1 Eq. 7) and CISPO kept; RL steps s: the steps' summed time; wall s: the whole run's.", "",
              "Tokens PPO-clip would have zeroed most often (count over the run):"]
    lines += [f"- {label}: " + (", ".join(f"{text!r} {n}" for text, n in tokens) or "none")
              for label, tokens in forks.items()]
    return "\n".join(lines) + "\n"


def plot(configurations: list[Configuration], path: str | Path, panels=tuple(PANELS)) -> Path:
    """Draw `panels` (names in PANELS) against RL step, one colour per configuration: the mean over its
    runs, with a min–max band when it has several. Writes a PNG to `path` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    cols = min(len(panels), 4)
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, squeeze=False, layout="constrained",
                             figsize=(4.2 * cols, 3.2 * math.ceil(len(panels) / cols) + 0.4 * len(configurations)))
    for ax, name in zip(axes.flat, panels):
        ylabel, keys = PANELS[name]
        for i, c in enumerate(configurations):
            for key, style in zip(keys, ("-", "--")):
                steps, mean, low, high = c.curve(key)
                ax.plot(steps, mean, style, color=f"C{i % 10}", marker="o" if name == "eval_accuracy" else None, ms=3)
                if len(c.runs) > 1:
                    ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        if not ax.lines or not any(len(line.get_xdata()) for line in ax.lines):
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", color="gray")
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=f"C{i % 10}") for i in range(len(configurations))]
    labels = [textwrap.fill(c.label, 90) + (f"  ({len(c.runs)} runs: mean, band min–max)" if len(c.runs) > 1 else "")
              for c in configurations]
    fig.legend(handles, labels, loc="outside lower center", fontsize="small")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


@dataclass
class ReportResult:
    figure: Path                # report.png
    table: Path                 # report.md, the same text as `text`
    text: str
    configurations: list[Configuration]
    rows: list[dict]            # table_rows(configurations)
    fork_tokens: dict[str, list[tuple[str, int]]]  # label -> (text, count), most often first


def report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> ReportResult:
    """Group `run_dirs` into configurations (`group_runs`), draw every panel to OUT/report.png and write
    the table to OUT/report.md. OUT is `out_dir`, by default the run dir for one run and the runs'
    nearest common parent dir for several. Raises RecipeError (one line naming the path) for a run dir
    that cannot be read."""
    if not run_dirs:
        raise RecipeError("cispo report needs at least one run dir")
    configurations = group_runs(run_dirs)
    out = Path(out_dir) if out_dir else Path(os.path.commonpath([os.path.abspath(d) for d in run_dirs]))
    out.mkdir(parents=True, exist_ok=True)
    rows = table_rows(configurations)
    forks = {c.label: c.fork_tokens() for c in configurations}
    text = render(rows, forks)
    (out / "report.md").write_text(text)
    return ReportResult(plot(configurations, out / "report.png"), out / "report.md", text, configurations, rows, forks)
