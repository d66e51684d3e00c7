"""Parallel scoring in worker processes with a hard timeout of our own.

math-verify times out with `signal.alarm`, which only works on a main thread, and a user's reward
can hang or crash; so every call runs in a child process that is killed when it overruns.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait


@dataclass
class RewardResult:
    score: float
    status: str  # ok | error | timeout
    error: str = ""


def _serve(fd: int) -> None:
    from rewards.plugins import call_reward
    from rewards.sandbox import SandboxFailure

    conn = Connection(fd)
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        fn, args, n = msg
        try:
            scores = call_reward(fn, *args)
            scores = [float(x) for x in scores] if getattr(fn, "batched", False) else [float(scores)]
            if len(scores) != n:
                raise ValueError(f"a batched reward returned {len(scores)} scores for {n} samples")
            conn.send([RewardResult(x, "ok") for x in scores])
        except Exception as exc:  # a user's reward may raise anything; report it, keep serving
            status = "sandbox_error" if isinstance(exc, SandboxFailure) else "error"
            last = traceback.extract_tb(exc.__traceback__)[-1]
            conn.send([RewardResult(0.0, status, f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})")] * n)


class _Worker:
    # A fresh interpreter rather than multiprocessing: fork would copy Ray's and torch's threads,
    # and spawn would re-run the user's main script.
    def __init__(self):
        ours, child = socket.socketpair()
        code = f"from rewards.pool import _serve; _serve({child.fileno()})"
        path = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                     env={**os.environ, "PYTHONPATH": path})
        child.close()
        self.conn = Connection(ours.detach())
        self.job: tuple[list[int], tuple] | None = None  # (item indices, arguments)
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class ScoringPool:
    """Runs `fn(*args)` for many argument tuples across `num_workers` processes."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self._workers = [_Worker() for _ in range(num_workers)]

    def map(self, fn, items: list[tuple]) -> list[RewardResult]:
        """`fn(*item)` for each item. A batched reward (`fn.batched`, see `rewards.plugins`) gets
        one call per worker with the items' columns as lists, and a limit of timeout_s per item."""
        if getattr(fn, "batched", False):
            chunks = [list(range(len(items)))[w::len(self._workers)] for w in range(len(self._workers))]
            jobs = [(c, tuple(map(list, zip(*[items[i] for i in c])))) for c in chunks if c]
        else:
            jobs = [([i], item) for i, item in enumerate(items)]
        results: list[RewardResult | None] = [None] * len(items)
        pending = jobs[::-1]
        while pending or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.job is None and pending:
                    w.job = pending.pop()
                    w.deadline = time.monotonic() + self.timeout_s * len(w.job[0])
                    w.conn.send((fn, w.job[1], len(w.job[0])))
            busy = [w for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for i, w in enumerate(self._workers):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        out = w.conn.recv()
                    except EOFError:  # the scorer killed its own process
                        out = [RewardResult(0.0, "error", f"scoring process died (exit {w.proc.poll()})")] * len(w.job[0])
                        self._replace(i)
                elif time.monotonic() >= w.deadline:
                    out = [RewardResult(0.0, "timeout", f"no result within {self.timeout_s}s per sample")] * len(w.job[0])
                    self._replace(i)
                else:
                    continue
                for j, r in zip(w.job[0], out):  # `w` is the old worker even if it was replaced
                    results[j] = r
                w.job = None
        return results

    def _replace(self, i: int) -> None:
        self._workers[i].kill()
        self._workers[i] = _Worker()

    def close(self) -> None:
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
            try:
                w.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                w.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
