"""Many `cispo train` runs as processes, `parallel` at a time, each after the run it needs (e.g. the warm
start it starts from): what `cispo compare` runs. A run dir holding summary.json is finished and skipped;
one with a checkpoint is resumed; any other is started afresh. So a crash or Ctrl-C loses at most the
runs in flight since their last checkpoint."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cispo import checkpoint


@dataclass
class Job:
    """One `cispo train` process: its run dir, recipe and overrides, and the job that must finish first."""
    name: str
    run_dir: Path
    recipe: str
    overrides: list[str]  # every key=value of its command line
    after: Job | None = None
    rc: int | None = None  # None: not run yet; 0: finished (or found finished); -1: skipped; else failed

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


def _launch(job: Job) -> subprocess.Popen:
    overrides = list(job.overrides)
    if checkpoint.latest(job.run_dir) is not None:
        overrides.append("run.resume=true")
    elif job.run_dir.exists():  # died before its first checkpoint: nothing in it to keep
        shutil.rmtree(job.run_dir)
    job.run_dir.mkdir(parents=True, exist_ok=True)
    with job.log.open("a") as log:
        # Its own session: a Ctrl-C reaches only this runner, which passes each run one SIGTERM (a run
        # stops at its next step boundary with a checkpoint; a second signal would stop it mid-step).
        return subprocess.Popen([sys.executable, "-m", "cispo.cli", "train", job.recipe, *overrides],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_jobs(jobs: list[Job], parallel: int) -> bool:
    """Run the unfinished jobs, `parallel` at a time, each after the job it needs. Returns False
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
            while ready and len(running) < parallel:
                job = ready.pop(0)
                pending.remove(job)
                print(f"{job.name}: started (log {job.log})", flush=True)
                proc = _launch(job)
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
