"""Parallel scoring in worker processes with a hard timeout of our own.

math-verify times out with `signal.alarm`, which only works on a main thread, and a user's reward
can hang, crash, or return something that is not a score; so every call runs in a child process that
is killed when it overruns, and every score is checked here, whichever reward produced it.

Ctrl-C, `timeout` and SLURM signal every process of the job, children included; the children block
SIGINT and SIGTERM (`signals_left_to_parent`) so that the parent alone decides how the step ends.
"""
from __future__ import annotations

import math
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from rewards.types import RewardInput


@dataclass
class RewardResult:
    score: float
    status: str  # ok | error | timeout | sandbox_error
    error: str = ""


@contextmanager
def signals_left_to_parent():
    """Processes started inside this block (and everything they start) have SIGINT and SIGTERM blocked:
    the signal mask survives fork and exec, and a blocked signal is never delivered, whatever handler the
    child installs. So a signal to the whole process group (Ctrl-C in a terminal, `timeout`, SLURM's
    scancel or preemption) reaches only the parent, which finishes its step and shuts the children
    down itself; SIGKILL still ends them. Ray blocks SIGINT in its own daemons the same way."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _result(score) -> RewardResult:
    """A reward's output as a result: a finite number is `ok`; None, NaN, inf or a non-number is an
    `error` scoring 0 (a NaN reward would make its whole group's advantages NaN)."""
    if score is None or isinstance(score, (str, bytes)):
        return RewardResult(0.0, "error", f"the reward returned {score!r}, not a number")
    try:
        value = float(score)
    except (TypeError, ValueError):
        return RewardResult(0.0, "error", f"the reward returned a {type(score).__name__}, not a number")
    if not math.isfinite(value):
        return RewardResult(0.0, "error", f"the reward returned {value}")
    return RewardResult(value, "ok")


def _serve(fd: int) -> None:
    from rewards.sandbox import SandboxFailure

    conn = Connection(fd)
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent went away
            return
        if msg is None:
            return
        reward, inputs = msg
        try:
            scores = list(pickle.loads(reward)(inputs))  # unpickled here, so a failed load is this batch's error
            if len(scores) != len(inputs):
                raise ValueError(f"the reward returned {len(scores)} scores for {len(inputs)} samples")
            conn.send([_result(s) for s in scores])
        except Exception as exc:  # a user's reward may raise anything; report it, keep serving
            status = "sandbox_error" if isinstance(exc, SandboxFailure) else "error"
            last = traceback.extract_tb(exc.__traceback__)[-1]
            conn.send([RewardResult(0.0, status, f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})")]
                      * len(inputs))


@dataclass
class _Job:
    indices: list[int]  # into the inputs of one `map`
    inputs: list[RewardInput]
    retried: bool = False  # a job whose process died runs once more, on a fresh process


class _Worker:
    # A fresh interpreter rather than multiprocessing: fork would copy Ray's and torch's threads,
    # and spawn would re-run the user's main script.
    def __init__(self):
        ours, child = socket.socketpair()
        code = f"from rewards.pool import _serve; _serve({child.fileno()})"
        path = os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH")]))
        with signals_left_to_parent():
            self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=[child.fileno()],
                                         env={**os.environ, "PYTHONPATH": path})
        child.close()
        self.conn = Connection(ours.detach())
        self.job: _Job | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.conn.close()


class ScoringPool:
    """Scores RewardInputs with a reward across `num_workers` processes, `timeout_s` per sample."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self._workers = [_Worker() for _ in range(num_workers)]

    def map(self, reward, inputs: list[RewardInput]) -> list[RewardResult]:
        """One result per input, in order. `reward` is what `rewards.registry.build` returns, or any
        reward function (adapted by parameter name, see `rewards.plugins`; a ValueError names a
        parameter it cannot fill). A per-sample reward gets one input per call; a batched one a
        share of the inputs per worker, with a limit of timeout_s per input."""
        from rewards.plugins import adapt

        reward = adapt(reward)
        try:
            sent = pickle.dumps(reward)
        except Exception as exc:
            raise ValueError(f"the reward cannot be sent to the scoring processes: {type(exc).__name__}: {exc}") from None
        if reward.batched:
            chunks = [list(range(len(inputs)))[w::len(self._workers)] for w in range(len(self._workers))]
            pending = [_Job(c, [inputs[i] for i in c]) for c in chunks if c]
        else:
            pending = [_Job([i], [x]) for i, x in enumerate(inputs)]
        results: list[RewardResult | None] = [None] * len(inputs)
        pending.reverse()
        while pending or any(w.job is not None for w in self._workers):
            for i, w in enumerate(self._workers):
                if w.job is None and pending:
                    self._send(i, pending.pop(), sent)
            busy = [w for w in self._workers if w.job is not None]
            wait_s = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready = wait([w.conn for w in busy], timeout=wait_s)
            for i, w in enumerate(self._workers):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        out = w.conn.recv()
                    except (EOFError, OSError):  # the process died: killed from outside, or by the reward
                        self._replace(i)
                        if not w.job.retried:  # a kill from outside is not the reward's doing: once more
                            w.job.retried = True
                            pending.append(w.job)
                            w.job = None
                            continue
                        out = [RewardResult(0.0, "error", f"scoring process died twice (exit {w.proc.returncode})")] \
                            * len(w.job.indices)
                elif time.monotonic() >= w.deadline:
                    out = [RewardResult(0.0, "timeout", f"no result within {self.timeout_s}s per sample")] \
                        * len(w.job.indices)
                    self._replace(i)
                else:
                    continue
                for j, r in zip(w.job.indices, out):  # `w` is the old worker even if it was replaced
                    results[j] = r
                w.job = None
        return results

    def _send(self, i: int, job: _Job, reward: bytes) -> None:
        """Give worker i the job; a worker found dead (killed while idle) is replaced first."""
        try:
            self._workers[i].conn.send((reward, job.inputs))
        except OSError:  # BrokenPipeError, ConnectionResetError
            self._replace(i)
            self._workers[i].conn.send((reward, job.inputs))
        w = self._workers[i]
        w.job, w.deadline = job, time.monotonic() + self.timeout_s * len(job.indices)

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
