"""Per-step records: phase timings, the rollout's figures, one console line, metrics.jsonl, and wandb
(offline by default)."""
from __future__ import annotations

import json
import os
import statistics
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from cispo.config import Recipe, RecipeError

# What the progress line shows, in order: (metric, label, format).
_CONSOLE = [("reward_mean", "reward", ".3f"), ("response_length_mean", "len", ".1f"),
            ("clip_fraction", "clip", ".3f"), ("is_weight_max", "r_max", ".2f"), ("entropy", "H", ".3f"),
            ("grad_norm", "|g|", ".3f"), ("eval_accuracy", "eval", ".3f"), ("time_step_s", "s", ".2f")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]) if ordered else 0.0


class Timer:
    """Seconds per phase within one step; repeated phases (refill draws) add up. With a `label` (an RL
    step's "step 3"), each phase announces itself on the console as it starts ("step 3: reward"), so a
    user sees where a slow or stuck step is."""

    def __init__(self, label: str | None = None):
        self.label = label
        self.start = time.perf_counter()
        self.spent = {"rollout": 0.0, "reward": 0.0, "train": 0.0, "sync": 0.0, "eval": 0.0}

    @contextmanager
    def __call__(self, phase: str):
        if self.label:
            print(f"{self.label}: {phase}", flush=True)
        t0 = time.perf_counter()
        yield
        self.spent[phase] += time.perf_counter() - t0

    def seconds(self) -> dict:
        return {**{f"time_{k}_s": v for k, v in self.spent.items()}, "time_step_s": time.perf_counter() - self.start}


def top_tokens(counts: dict[int, int], tok, k: int = 10) -> list[list]:
    """The `k` most counted token ids as [id, text, count] (text decoded with `tok`), most counted first,
    so a metrics row can name the fork tokens without the tokenizer."""
    return [[i, tok.decode([i]), n] for i, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:k]]


class MetricsLog:
    def __init__(self, run_dir: Path, recipe: Recipe, constant: dict | None = None):
        """`constant`: figures that hold for the whole run and go in every row (the sandbox's isolation
        level, data rows skipped), so that they can't go unnoticed in any slice of the log."""
        self.path = run_dir / "metrics.jsonl"
        self.constant = constant or {}
        self.total = recipe.run.max_steps
        self.wandb = None
        if recipe.wandb.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.wandb = wandb.init(project=recipe.wandb.project, mode=recipe.wandb.mode, dir=str(run_dir),
                                    config=recipe.model_dump(mode="json"), name=run_dir.name)

    def log(self, row: dict) -> dict:
        """Append one step's row (plus the run's constants) and print its progress line; returns the row."""
        row = {**row, **self.constant}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        shown = " ".join(f"{label} {row[key]:{fmt}}" for key, label, fmt in _CONSOLE if key in row)
        print(f"step {row['step']}/{self.total} {shown}", flush=True)
        return row

    def truncate(self, last_step: int) -> None:
        """On resume, drop rows of steps after the checkpoint (they will be logged again), and a torn last
        line (with a warning); the rows kept stay byte for byte. Written aside and renamed, so a crash
        here loses nothing."""
        if self.path.exists():
            kept = [line for line, row in _lines(self.path) if row["step"] <= last_step]
            staging = self.path.with_name(self.path.name + ".tmp")
            staging.write_text("".join(line + "\n" for line in kept))
            staging.replace(self.path)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _lines(path: Path) -> list[tuple[str, dict]]:
    """(line, row) for each row of a metrics.jsonl. A row is written as one line ending in a newline, so a
    last line without one that is not a whole JSON object was torn by a crash mid-write: it is dropped with
    a warning. Any other line that is not a JSON object is a RecipeError naming file:line."""
    lines = path.read_text().split("\n")  # after the last newline: "" unless the last line was torn
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError(f"not a metrics row: {line[:60]!r}")
        except ValueError as exc:  # json.JSONDecodeError is one
            if n == len(lines):
                warnings.warn(f"{path}:{n}: dropped a torn last line (the run stopped while writing it): "
                              f"{line[:60]!r}", stacklevel=3)
                break
            raise RecipeError(f"{path}:{n}: malformed metrics row ({exc})") from None
        out.append((line, row))
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl, one per logged step, without a torn last line (see `_lines`).
    Raises RecipeError, one line, when the file is missing or a complete line is malformed."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        if not Path(run_dir).exists():
            raise RecipeError(f"run dir {run_dir} does not exist")
        raise RecipeError(f"run dir {run_dir} has no metrics.jsonl (a run writes it after its first step)")
    return [row for _, row in _lines(path)]


def time_medians(rows: list[dict]) -> dict:
    """Median seconds of each phase over the run's steps (none with run.max_steps=0)."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("time_")]
    return {f"median_{k}": statistics.median(r[k] for r in rows) for k in keys}
