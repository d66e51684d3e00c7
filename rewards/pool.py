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
    conn = Connection(fd)
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send(RewardResult(float(fn(*args)), "ok"))
        except Exception as exc:  # a user's reward may raise anything; report it, keep serving
            last = traceback.extract_tb(exc.__traceback__)[-1]
            conn.send(RewardResult(0.0, "error", f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})"))


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
        self.job: int | None = None
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
        results: list[RewardResult | None] = [None] * len(items)
        pending = list(range(len(items)))[::-1]
        while pending or any(w.job is not None for w in self._workers):
            for w in self._workers:
                if w.job is None and pending:
                    w.job, w.deadline = pending.pop(), time.monotonic() + self.timeout_s
                    w.conn.send((fn, items[w.job]))
            busy = [w for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for i, w in enumerate(self._workers):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        results[w.job] = w.conn.recv()
                    except EOFError:  # the scorer killed its own process
                        results[w.job] = RewardResult(0.0, "error", f"scoring process died (exit {w.proc.poll()})")
                        self._replace(i)
                        continue
                    w.job = None
                elif time.monotonic() >= w.deadline:
                    results[w.job] = RewardResult(0.0, "timeout", f"no result within {self.timeout_s}s")
                    self._replace(i)
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
