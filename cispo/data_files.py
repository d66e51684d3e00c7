"""A data file's rows, in the formats users keep them in.

Our JSONL (.jsonl, .jsonl.gz) is read here line by line. Parquet, CSV, JSON, Arrow files and
`save_to_disk` directories (TRL's and verl's layouts) go through HF `datasets`, which converts a file to
Arrow in its cache once and memory-maps it, so a table larger than memory can be read. JSONL stays ours because `datasets` infers one schema for
the whole file: it turned an answer "1" into the integer 1 when another row's answer was a number, and
one malformed line failed the whole file, so `data.on_bad_row` could not apply to that row.
With `data.streaming` every type, JSONL too, is read as a `datasets.IterableDataset` (`stream`).
"""
from __future__ import annotations

import csv
import gzip
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from cispo.section import RecipeError

BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}  # suffix -> datasets' packaged builder
KINDS = ".jsonl, .jsonl.gz, .json, .csv, .parquet, .arrow, or a save_to_disk directory"
ROW, LINE = "__cispo_row__", "__cispo_line__"  # a streamed row's index in its file, and a JSONL line's text


def is_jsonl(path: Path) -> bool:
    return path.name.endswith((".jsonl", ".jsonl.gz"))


def table(path: Path):
    """The file or `save_to_disk` directory at `path` as a `datasets.Dataset` (memory-mapped Arrow).
    RecipeError, one line, for a type it does not know, a directory of several splits, or a file that
    does not parse."""
    import datasets

    datasets.disable_progress_bars()
    with reading(path):
        if path.is_dir():
            found = datasets.load_from_disk(str(path))
            if isinstance(found, datasets.DatasetDict):
                raise RecipeError(f"{path} holds the splits {', '.join(found)}: name one, e.g. {path / next(iter(found))}")
            return found
        if path.suffix == ".arrow":
            return datasets.Dataset.from_file(str(path))
        return _load(path)


@contextmanager
def reading(path: Path):
    """Turns what datasets and pyarrow raise (many types) into a RecipeError: the path and the first line."""
    try:
        yield
    except RecipeError:
        raise
    except Exception as exc:
        raise RecipeError(f"{path}: cannot read it: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _load(path: Path, streaming: bool = False):
    """A parquet, CSV or JSON file through datasets' packaged builder: converted to Arrow in its cache and
    memory-mapped, or (`streaming`) read as it is iterated."""
    import datasets

    if path.suffix not in BUILDERS:
        raise RecipeError(f"{path}: unknown data file type; valid: {KINDS}")
    options = {}
    if path.suffix == ".csv":  # CSV has no types: every column as the text written, so "007" stays "007"
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.load_dataset(BUILDERS[path.suffix], data_files=str(path), split="train", streaming=streaming, **options)


def rows(path: Path, columns: dict[str, str]) -> Sequence[str | dict]:
    """The rows of the file at `path`, by index: for JSONL, each line's text (the caller parses it, so a
    malformed line is that row's error; a blank line is ""), held in memory; otherwise the memory-mapped
    table, whose row i is a dict read from disk when indexed, so a file larger than memory can be read.
    The `columns` the recipe maps must exist in a table (RecipeError naming the key and the columns there
    are)."""
    if is_jsonl(path):
        return list(_lines(path))
    found = table(path)
    _check_columns(path, found.column_names, columns)
    return found


def _check_columns(path: Path, names: list[str], columns: dict[str, str]) -> None:
    for ours, theirs in columns.items():
        if theirs not in names:
            raise RecipeError(f"{path}: no column {theirs!r} (columns.{ours}); it has {', '.join(names)}")


def stream(path: Path, columns: dict[str, str], seed: int, buffer: int):
    """The rows of the file at `path` as a `datasets.IterableDataset`, read as they are drawn and never
    converted whole: for files larger than memory, or than the disk's room for datasets' Arrow cache.
    Each row is a dict with its 0-based index in the file under `ROW`, and (JSONL) its text under
    `LINE`; they come in a shuffle-buffer order of `buffer` rows seeded by `seed` (`set_epoch(e)` gives
    epoch e another). The mapped `columns` must exist (RecipeError, as `rows`)."""
    import datasets

    datasets.disable_progress_bars()
    if is_jsonl(path):
        found = datasets.IterableDataset.from_generator(_line_rows, gen_kwargs={"path": path},
                                                         features=datasets.Features({LINE: datasets.Value("string")}))
    else:
        with reading(path):
            if path.is_dir() or path.suffix == ".arrow":  # already Arrow on disk, memory-mapped: nothing to convert
                found = table(path).to_iterable_dataset()
            else:
                found = _load(path, streaming=True)
            names = found.column_names or list(next(iter(found), {}))  # JSON declares none: its first row's
        _check_columns(path, names, columns)
    return found.map(lambda row, i: {ROW: i}, with_indices=True).shuffle(seed=seed, buffer_size=buffer)


def _lines(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as lines:
        yield from lines


def _line_rows(path: Path):
    yield from ({LINE: line} for line in _lines(path))


def where(path: Path, i: int) -> str:
    """Row i of `path` as a person finds it: the line number of a JSONL file, else "row i" (0-based, as
    `dataset[i]` numbers it)."""
    return str(i + 1) if is_jsonl(path) else f"row {i}"
