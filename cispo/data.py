"""Prompts: a weighted mix of sources (generated arithmetic, GSM8K, MATH, APPS, HumanEval, plain JSONL,
verl's layout) with a curriculum, drawn per step from a seeded stream. Each source's file may be JSONL,
parquet, CSV, JSON, Arrow or a `save_to_disk` directory (cispo.data_files)."""
from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cispo import data_files
from cispo.registry import Registry
from cispo.section import RecipeError
from rewards.math import last_boxed

if TYPE_CHECKING:  # cispo.sections imports FORMATS from here
    from cispo.sections import DataConfig, SourceConfig

# How a source's rows become prompts: a row loader `fn(row: dict) -> Prompt` raising KeyError /
# TypeError / ValueError on a malformed row, or (meta generated=True) a generator with no file.
FORMATS = Registry("data format")


def derive_seed(run_seed: int, step: int, stream: str, index: int = 0) -> int:
    """A 32-bit seed for one random stream of a run: the data of step `step` in `stream` ("rl0", "sft",
    "eval", ...), request `index`. A hash of the four (BLAKE2b), so it is the same in every process and
    Python version (unlike `hash()`) and a resumed run redraws exactly what the original drew."""
    digest = hashlib.blake2b(f"{run_seed}/{step}/{stream}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True)
class Prompt:
    text: str
    answer: str  # what the reward compares against: a math answer, or code tests as JSON text
    reference: str | None = None  # a reference response for the warm start, when the data has one
    source: str = ""  # the data source's name: picks its reward (reward.sources) and labels its metrics
    # The row's other columns (TRL passes them to reward functions as keyword lists).
    fields: dict = field(default_factory=dict, hash=False, compare=False)
    # Chat messages [{"role", "content"}, ...] when the data gives the prompt as a conversation (verl);
    # encoded with the tokenizer's chat template. `text` is then the last user turn.
    messages: tuple = field(default=(), hash=False)

    @property
    def target(self) -> str:
        """The supervised response for the warm start: the reference, else the boxed answer."""
        return self.reference if self.reference is not None else f"\\boxed{{{self.answer}}}"


@FORMATS.register("arith", generated=True)
def arith_problems(digits: int, source: str = "arith") -> list[Prompt]:
    hi = 10**digits
    return [Prompt(f"{a}+{b}=", str(a + b), source=source) for a in range(hi) for b in range(hi)]


# ---------------------------------------------------------------- one row -> Prompt, per format
# Each raises KeyError / TypeError / ValueError on a malformed row; `read_rows` names its file:line.

@FORMATS.register("jsonl")
def _jsonl(row: dict) -> Prompt:
    text = row["prompt"] if "prompt" in row else row["question"]
    if text is None or row["answer"] is None:  # an empty cell of a table: not the text "None"
        raise ValueError("null prompt or answer")
    return Prompt(str(text), str(row["answer"]).split("####")[-1].strip(), row.get("target"))


@FORMATS.register("gsm8k")
def _gsm8k(row: dict) -> Prompt:
    reasoning, sep, answer = row["answer"].rpartition("####")
    if not sep:
        raise ValueError("GSM8K answer has no '#### <number>'")
    answer = answer.strip().replace(",", "")
    # The <<48/2=24>> calculator annotations are not text a model should learn to write.
    steps = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return Prompt(row["question"], answer, f"{steps}\n\\boxed{{{answer}}}")


@FORMATS.register("math")
def _math(row: dict) -> Prompt:
    answer = row.get("answer") or last_boxed(row["solution"])
    if not answer:
        raise ValueError("no 'answer' and no \\boxed{} in 'solution'")
    return Prompt(row["problem"], str(answer), row.get("solution"))


@FORMATS.register("apps")
def _apps(row: dict) -> Prompt:
    tests = row["input_output"]
    tests = json.loads(tests) if isinstance(tests, str) else tests
    if not tests.get("inputs") or len(tests["inputs"]) != len(tests.get("outputs", [])):
        raise ValueError("input_output needs as many 'outputs' as 'inputs', at least one")
    solutions = row.get("solutions") or "[]"
    solutions = json.loads(solutions) if isinstance(solutions, str) else solutions
    text = row["question"] + (f"\n{row['starter_code']}" if row.get("starter_code") else "")
    return Prompt(text, json.dumps(tests), solutions[0] if solutions else None)


@FORMATS.register("humaneval")
def _humaneval(row: dict) -> Prompt:
    tests = {k: row[k] for k in ("prompt", "test", "entry_point")}  # what rewards.code runs `check` with
    return Prompt(row["prompt"], json.dumps(tests), row.get("canonical_solution"))


@FORMATS.register("verl")
def _verl(row: dict) -> Prompt:
    """verl's RL parquet layout, unchanged: `prompt` a list of chat messages, `reward_model.ground_truth`
    the answer (JSON text unless a string, e.g. code tests), `data_source` the row's source, which picks
    its reward (reward.sources, else reward.name) and reaches a verl `compute_score` as `data_source`."""
    messages = row["prompt"]
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                                for m in messages):
        raise ValueError("'prompt' is not a list of chat messages with 'role' and 'content'")
    truth = row["reward_model"]["ground_truth"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Prompt(users[-1] if users else messages[-1]["content"], truth if isinstance(truth, str) else json.dumps(truth),
                  source=str(row["data_source"]), messages=tuple(messages))


def _prompt(row: str | dict, fmt: str, columns: dict[str, str], source: str) -> Prompt:
    """One raw row (a JSONL line, or a table's row) as a Prompt; raises on a malformed row (see FORMATS)."""
    row = json.loads(row) if isinstance(row, str) else row
    prompt = FORMATS[fmt].fn({**row, **{ours: row[theirs] for ours, theirs in columns.items()}})
    if not isinstance(prompt.text, str) or not prompt.text:
        raise ValueError("empty prompt")
    own = str(row[columns["source"]]) if "source" in columns else prompt.source
    return replace(prompt, source=own or source, fields={k: v for k, v in row.items() if k != "prompt"})


class Prompts(Sequence):
    """The good rows of a file as Prompts, each built when indexed (random.sample draws by index): the rows
    stay where cispo.data_files keeps them (a table memory-mapped on disk), plus 8 bytes per good row."""

    def __init__(self, rows: Sequence, good: array, convert):
        self.rows, self.good, self.convert = rows, good, convert

    def __len__(self) -> int:
        return len(self.good)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.convert(self.rows[self.good[i]])


def read_rows(path: str | Path, fmt: str = "jsonl", source: str = "", skip_bad: bool = False,
              columns: dict[str, str] | None = None) -> tuple[Prompts, int]:
    """The prompts of the file at `path` (any type cispo.data_files reads) and how many bad rows were
    skipped. `columns` maps our names (prompt, answer, target, source) to the file's columns; a mapped
    `source` column (or verl's `data_source`) gives each row its own source name, else it is `source`.
    Every row is checked here, once; a bad row is an error naming file:line (file:row i for tables),
    unless `skip_bad`."""
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"data file not found: {path}")
    convert = functools.partial(_prompt, fmt=fmt, columns=columns or {}, source=source)
    rows, good, skipped = data_files.rows(path, columns or {}), array("q"), 0
    for i, row in enumerate(rows):
        checked = _checked(path, i, row, fmt, convert, skip_bad)
        skipped += checked is BAD
        if isinstance(checked, Prompt):
            good.append(i)
    return Prompts(rows, good, convert), skipped


BAD = object()  # _checked's answer for a bad row that data.on_bad_row=skip skips


def _checked(path: Path, i: int, row: str | dict, fmt: str, convert, skip_bad: bool) -> Prompt | None | object:
    """Row i of `path` as a Prompt; None for a blank JSONL line; BAD for a bad row when `skip_bad`, else a
    RecipeError naming file:line (file:row i for tables)."""
    if isinstance(row, str) and not row.strip():
        return None
    try:
        return convert(row)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        if not skip_bad:
            raise RecipeError(f"{path}:{data_files.where(path, i)}: bad {fmt} row ({type(exc).__name__}: {exc}); "
                              f"data.on_bad_row=skip skips such rows") from None
        return BAD


class Stream:
    """A training file read as a stream (data.streaming), for files larger than memory: `take(k)` gives the
    next k good prompts in a seeded shuffle-buffer order (datasets' IterableDataset.shuffle), epoch after
    epoch. Each row is checked when read, as read_rows checks it up front (file:row, data.on_bad_row);
    `skipped` counts the bad rows skipped so far."""

    def __init__(self, path: str | Path, fmt: str, source: str, skip_bad: bool, columns: dict[str, str],
                 seed: int, buffer: int):
        self.path, self.fmt, self.skip_bad = Path(path), fmt, skip_bad
        if not self.path.exists():
            raise RecipeError(f"data file not found: {path}")
        self.convert = functools.partial(_prompt, fmt=fmt, columns=columns, source=source)
        self.rows = data_files.stream(self.path, columns, seed, buffer)
        self.epoch, self.good, self.skipped, self.read = 0, 0, 0, 0  # read: rows drawn from this epoch
        self.it = iter(self.rows)

    def position(self) -> list[int]:
        """Where the stream stands, for a checkpoint: [epoch, rows read in it, good rows among them,
        bad rows skipped so far]."""
        return [self.epoch, self.read, self.good, self.skipped]

    def seek(self, position: list[int]) -> None:
        """Back to a `position()`: epoch e's order again, its first rows read past unconverted (the shuffle
        buffer's order is fixed by seed and epoch, so they are the rows drawn before), so a resumed run
        neither repeats nor skips a prompt."""
        self.epoch, read, self.good, self.skipped = position
        self.rows.set_epoch(self.epoch)
        self.it, self.read = iter(self.rows), read
        with data_files.reading(self.path):
            for _ in range(read):
                next(self.it)

    def take(self, k: int) -> list[Prompt]:
        out = []
        while len(out) < k:
            with data_files.reading(self.path):
                row = next(self.it, None)
            if row is None:  # the end of an epoch: the next one, in another order
                if not self.good:
                    raise RecipeError(f"{self.path}: no good rows to stream ({self.skipped} bad rows skipped)")
                self.epoch, self.good, self.read = self.epoch + 1, 0, 0
                self.rows.set_epoch(self.epoch)
                self.it = iter(self.rows)
                continue
            self.read += 1
            i = row.pop(data_files.ROW)
            checked = _checked(self.path, i, row.get(data_files.LINE, row), self.fmt, self.convert, self.skip_bad)
            self.skipped += checked is BAD
            if isinstance(checked, Prompt):
                self.good += 1
                out.append(checked)
        return out


class PromptSource:
    """Train and held-out eval prompts of every source. `batch(step)` depends only on (seed, stream, step)
    for a pool read whole, and a streamed pool's place is `position()`, which checkpoints hold, so resume
    is exact. Which sources a batch draws from, and in what shares, follows the curriculum."""

    def __init__(self, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.sources = cfg.mix()
        self.pools: dict[str, Sequence[Prompt]] = {}
        self.eval: list[Prompt] = []
        self.skipped: dict[str, int] = {}  # data file -> bad rows skipped (data.on_bad_row=skip)
        for s in self.sources:
            train, held_out = self._load(s)
            if not train:
                skipped = f" ({self.skipped[s.path]} bad rows skipped)" if s.path in self.skipped else ""
                raise RecipeError(f"data source {s.name!r}: the training split {s.path} has no rows{skipped}")
            self.pools[s.name] = train
            self.eval += held_out[:cfg.eval_size]

    def _load(self, s: SourceConfig) -> tuple[Sequence[Prompt], Sequence[Prompt]]:
        if FORMATS[s.format].meta.get("generated"):
            problems = FORMATS[s.format].fn(self.cfg.digits, s.name)
            if len(problems) <= self.cfg.eval_size:
                raise RecipeError(f"data source {s.name!r}: data.eval_size={self.cfg.eval_size} takes all "
                                  f"{len(problems)} generated problems (data.digits={self.cfg.digits}), leaving none "
                                  f"to train on; lower data.eval_size")
            random.Random(derive_seed(self.seed, 0, "split")).shuffle(problems)
            return problems[self.cfg.eval_size:], problems[:self.cfg.eval_size]
        if s.path is None:
            raise RecipeError(f"data source {s.name!r} ({s.format}) needs a path")
        skip_bad, splits = self.cfg.on_bad_row == "skip", []
        if self.cfg.streaming:  # the held-out file is read whole: eval_size rows are scored at every eval
            splits.append(Stream(s.path, s.format, s.name, skip_bad, s.columns, derive_seed(self.seed, 0, "stream"),
                                 self.cfg.shuffle_buffer))
        for path in (s.path, s.eval_path)[len(splits):]:
            rows, skipped = read_rows(path, s.format, s.name, skip_bad, s.columns) if path else ([], 0)
            if skipped:
                self.skipped[path] = skipped
            splits.append(rows)
        return splits[0], splits[1]

    def position(self) -> dict[str, list[int]]:
        """The data position beyond the step, for a checkpoint: each streamed source's `Stream.position()`
        (a pool read whole is drawn by step alone, so it has none)."""
        return {name: pool.position() for name, pool in self.pools.items() if isinstance(pool, Stream)}

    def seek(self, position: dict[str, list[int]]) -> None:
        for name, at in position.items():
            self.pools[name].seek(at)

    @property
    def train(self) -> list[Prompt]:
        return [p for pool in self.pools.values() for p in pool]

    def weights(self, step: int) -> dict[str, float]:
        """Each active source's weight at `step`: zero before its start_step, then ramping up to its weight."""
        out = {}
        for s in self.sources:
            ramp = 1.0 if s.ramp_steps == 0 else min(1.0, (step - s.start_step + 1) / s.ramp_steps)
            if step >= s.start_step and s.weight * ramp > 0:
                out[s.name] = s.weight * ramp
        return out

    def batch(self, step: int, size: int | None = None, stream: str = "rl") -> list[Prompt]:
        rng = random.Random(derive_seed(self.seed, step, stream))
        size = size or self.cfg.prompts_per_step
        weights = self.weights(step)
        if len(weights) == 1:  # one source: no draw for the shares, so single-source runs keep their order
            counts = {next(iter(weights)): size}
        else:
            counts = Counter(rng.choices(list(weights), list(weights.values()), k=size))
        return [p for name, k in counts.items() for p in self._draw(self.pools[name], k, rng)]

    @staticmethod
    def _draw(pool: Sequence[Prompt] | Stream, k: int, rng: random.Random) -> list[Prompt]:
        # A stream has no index to sample by: its next k rows, already shuffled by its buffer.
        return pool.take(k) if isinstance(pool, Stream) else rng.sample(pool, min(k, len(pool)))
