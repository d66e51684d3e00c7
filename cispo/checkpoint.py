"""Checkpoints that survive a kill: written to a temporary folder, fsynced, then renamed.

A checkpoint folder `ckpt/step-NNNNNN/` holds the DeepSpeed state of every rank (model, optimizer,
the trainer's counters) and `controller.json` (step, weight version, start accuracy). The rename is
the commit point: a folder without `controller.json`, or still named `*.tmp`, is torn and skipped.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

MARKER = "controller.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_dir(run_dir: Path, step: int) -> Path:
    path = run_dir / "ckpt" / f"step-{step:06d}.tmp"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def commit(staging: Path, controller_state: dict, keep_last: int) -> Path:
    """Write the controller's state last, fsync everything, rename into place, prune old ones."""
    (staging / MARKER).write_text(json.dumps(controller_state))
    _fsync_tree(staging)
    final = staging.with_suffix("")
    os.rename(staging, final)
    _fsync_tree(final.parent)
    for old in complete_checkpoints(final.parent.parent)[:-keep_last]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints, oldest first; torn ones are reported and skipped."""
    found = []
    for path in sorted((run_dir / "ckpt").glob("step-*")):
        if path.suffix == ".tmp" or not (path / MARKER).is_file():
            warnings.warn(f"skipping torn checkpoint {path} (never committed)", stacklevel=2)
            continue
        found.append(path)
    return found


def latest(run_dir: Path) -> tuple[Path, dict] | None:
    checkpoints = complete_checkpoints(run_dir)
    if not checkpoints:
        return None
    return checkpoints[-1], json.loads((checkpoints[-1] / MARKER).read_text())
