"""Prompts: generated arithmetic or JSONL rows, drawn per step from a seeded stream."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from cispo.config import DataConfig, RecipeError


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str

    @property
    def target(self) -> str:
        """The supervised response for the warm start."""
        return f"\\boxed{{{self.answer}}}"


def arith_problems(digits: int) -> list[Prompt]:
    hi = 10**digits
    return [Prompt(f"{a}+{b}=", str(a + b)) for a in range(hi) for b in range(hi)]


def read_jsonl(path: str | Path) -> list[Prompt]:
    """Rows with 'prompt'/'answer' (or GSM8K's 'question'/'answer'); a bad row names its file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"data file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(Prompt(str(row.get("prompt", row.get("question"))), str(row["answer"]).split("####")[-1].strip()))
        except (json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise RecipeError(f"{path}:{n}: bad data row ({type(exc).__name__}: {exc})") from None
    return rows


class PromptSource:
    """Train and held-out eval splits; `batch(step)` depends only on (seed, step), so resume is exact."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        if cfg.source == "arith":
            problems = arith_problems(cfg.digits)
            random.Random(seed).shuffle(problems)
            self.eval, self.train = problems[:cfg.eval_size], problems[cfg.eval_size:]
        else:
            if cfg.path is None:
                raise RecipeError("data.path is required when data.source is 'jsonl'")
            self.train = read_jsonl(cfg.path)
            self.eval = read_jsonl(cfg.eval_path)[:cfg.eval_size] if cfg.eval_path else []
        if not self.train:
            raise RecipeError("the training split is empty")

    def batch(self, step: int, size: int | None = None, stream: int = 0) -> list[Prompt]:
        rng = random.Random(f"{self.seed}/{stream}/{step}")
        return rng.sample(self.train, min(size or self.cfg.prompts_per_step, len(self.train)))
