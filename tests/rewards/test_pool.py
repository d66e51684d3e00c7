import os
import time
from pathlib import Path

from rewards.math import score, verify_boxed
from rewards.pool import RewardResult, ScoringPool
from rewards.types import RewardInput


def _hang(response: str, answer: str) -> float:
    time.sleep(float(response))
    return 1.0


def _hang_first_time(response: str, answer: str) -> float:
    """Writes `response` (a path) and hangs the first time, so a kill can land mid-sample; scores 1 once it exists."""
    path = Path(response)
    if not path.exists():
        path.write_text(str(os.getpid()))
        time.sleep(600)
    return 1.0


def _boom(response: str, answer: str) -> float:
    raise RuntimeError("reward exploded")


def sample(response: str, answer: str = "") -> RewardInput:
    return RewardInput(prompt="", response=response, answer=answer, source="test")


def test_pool_scores_in_order_and_isolates_hangs_and_errors():
    with ScoringPool(num_workers=2, timeout_s=30.0) as pool:  # the first call imports math-verify: slow under load
        items = [sample(f"so \\boxed{{{i}}}", str(i if i % 3 else i + 1)) for i in range(30)]
        results = pool.map(verify_boxed, items)
        assert [r.score for r in results] == [float(i % 3 != 0) for i in range(30)]
        pool.timeout_s = 1.5
        t0 = time.monotonic()
        hung = pool.map(_hang, [sample("30"), sample("0")])
        assert time.monotonic() - t0 < 10
        assert [r.status for r in hung] == ["timeout", "ok"] and hung[1].score == 1.0
        failed = pool.map(_boom, [sample("x")])[0]
        assert failed.status == "error" and "reward exploded" in failed.error
        # The pool keeps working after killing and replacing a worker.
        pool.timeout_s = 30.0
        assert pool.map(verify_boxed, [sample("\\boxed{7}", "7")])[0].score == 1.0


def test_math_score_public_api():
    assert score("<think>maybe \\boxed{3}</think> so \\boxed{42}", "42") == 1.0
    assert score("\\boxed{41}", "42") == 0.0
    assert score("no box here: 42", "42") == 0.0
    assert score("\\boxed{1,234}", "Natalia sold ... #### 1234") == 1.0


def _blocked(status: str) -> int:
    """The SigBlk mask from a /proc/PID/status text."""
    return int(next(line for line in status.splitlines() if line.startswith("SigBlk:")).split()[1], 16)


def _program_mask(response: str, answer: str) -> float:
    """The blocked-signal mask a sandboxed program starts with (run from inside a scoring process)."""
    from rewards import sandbox

    r = sandbox.run("print(open('/proc/self/status').read())", timeout_s=5.0, memory_mb=256)
    return float(_blocked(r.stdout))


def _scorers(others: frozenset = frozenset()) -> list:
    """A pool's scoring processes, as the OS sees them: this process's children serving rewards.pool, less
    `others` (those of other pools, such as `rewards.math.score`'s, which lives as long as the process)."""
    import psutil

    scorers = []
    for p in psutil.Process().children():
        try:
            if p not in others and "rewards.pool import _serve" in " ".join(p.cmdline()):
                scorers.append(p)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # another test's child, exited and not yet reaped
            pass
    return scorers


def test_scorers_leave_group_signals_to_the_parent_and_dead_ones_are_replaced(tmp_path):
    import signal
    import threading

    items = [sample(f"\\boxed{{{i}}}", str(i if i % 2 else i + 1)) for i in range(8)]
    right = [float(i % 2 == 1) for i in range(8)]
    # Another pool's scorer, killed below by mistake, would be left a zombie: with pids wrapping around (32768
    # here) it can sort before ours. `score` above started one that this process keeps.
    others = frozenset(_scorers())
    with ScoringPool(num_workers=2, timeout_s=30.0) as pool:
        assert [r.score for r in pool.map(verify_boxed, items)] == right
        # What Ctrl-C, `timeout` or scancel do to every process of the group: the scorers stay up.
        scorers = _scorers(others)
        assert len(scorers) == 2
        both = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
        assert all(_blocked(open(f"/proc/{p.pid}/status").read()) & both == both for p in scorers)
        for p in scorers:
            p.send_signal(signal.SIGINT)
            p.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert all(p.is_running() and p.status() != "zombie" for p in scorers)
        assert [r.score for r in pool.map(verify_boxed, items)] == right and _scorers(others) == scorers
        # A scorer killed while idle is replaced when it is next given work.
        scorers[0].kill()
        scorers[0].wait()
        assert [(r.status, r.score) for r in pool.map(verify_boxed, items)] == [("ok", s) for s in right]
        # Scorers killed in the middle of a sample: the sample is scored again on a fresh process. Each is killed
        # once it has written its marker (it is then inside the sample), not on a timer that a loaded machine delays.
        busy, markers = _scorers(others), [tmp_path / "a", tmp_path / "b"]

        def kill_when_inside():
            while not all(m.exists() and m.read_text() for m in markers):
                time.sleep(0.01)
            for p in busy:
                p.kill()
        threading.Thread(target=kill_when_inside, daemon=True).start()
        slow = pool.map(_hang_first_time, [sample(str(m)) for m in markers])
        assert [(r.status, r.score) for r in slow] == [("ok", 1.0), ("ok", 1.0)]
        assert not set(_scorers(others)) & set(busy)
        assert not any(p.is_running() for p in busy)  # reaped by the pool, not left as zombies
        # The program a code reward runs gets a plain mask, as under a judge, not the scorer's.
        assert pool.map(_program_mask, [sample("")])[0] == RewardResult(0.0, "ok")
