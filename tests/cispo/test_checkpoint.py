"""Checkpoints: torn ones are skipped; a run killed with SIGKILL resumes to identical metrics."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cispo import checkpoint
from cispo.metrics import read_metrics
from tests.conftest import REPO


def _fake(run_dir, step, committed=True, suffix=""):
    path = run_dir / "ckpt" / f"step-{step:06d}{suffix}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x")
    if committed:
        (path / checkpoint.MARKER).write_text(json.dumps({"step": step}))
    return path


def test_torn_checkpoints_are_skipped_and_old_ones_pruned(tmp_path):
    good = _fake(tmp_path, 2)
    _fake(tmp_path, 3, committed=False)          # died before the controller state was written
    _fake(tmp_path, 4, suffix=".tmp")            # died before the rename
    with pytest.warns(UserWarning, match="torn checkpoint"):
        path, state = checkpoint.latest(tmp_path)
    assert path == good and state == {"step": 2}
    staging = checkpoint.staging_dir(tmp_path, 5)
    (staging / "weights.bin").write_bytes(b"y")
    with pytest.warns(UserWarning):
        final = checkpoint.commit(staging, {"step": 5}, keep_last=1)
    assert final.name == "step-000005" and not good.exists()


# From the session's shared warm start (tests/conftest.py): no run spends time on SFT.
ARGS = ["data.digits=1", "data.eval_size=10", "data.prompts_per_step=4", "rollout.n_samples=4", "sft.steps=0",
        "run.save_every=1", "run.threads=1", "optim.lr=1e-4", "wandb.mode=disabled"]


@pytest.fixture
def cli(ray_session, warm_arith):
    """`cispo train` on tiny-arith from the shared warm start, as a process on the session's Ray."""
    def start(run_dir, *extra):
        env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
        return subprocess.Popen([sys.executable, "-m", "cispo.cli", "train", "recipes/tiny-arith.yaml", *ARGS,
                                 f"model.path={warm_arith}", f"run.dir={run_dir}", *extra], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return start


def _comparable(row):
    return {k: v for k, v in row.items() if not k.startswith("time_")}


def sigkill_at_checkpoint(run: subprocess.Popen, run_dir, step: int, timeout_s: float = 600) -> None:
    """SIGKILL `run` as soon as its checkpoint of `step` is committed."""
    ckpt = run_dir / "ckpt" / f"step-{step:06d}"
    deadline = time.monotonic() + timeout_s
    while not (ckpt / checkpoint.MARKER).exists():
        assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()


# The hardest layout: two ranks whose ZeRO-3 partitions each checkpoint and restore their own share.
RANKS = ["trainer.num_ranks=2", "trainer.zero_stage=3", "trainer.micro_batch_tokens=64"]


@pytest.mark.slow  # three 2-rank ZeRO-3 runs: 348 s under xdist at a load average of 17-20 on 2 cores
def test_sigkilled_run_resumes_to_identical_metrics(cli, tmp_path):
    # The whole run's replica is a worker of its own, the killed run's lives in rank 0 (tiny-arith's
    # resources.colocate): versions, not processes, decide the rows, so they match as well.
    whole = cli(tmp_path / "whole", "run.max_steps=8", "resources.colocate=false", *RANKS)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, out

    sigkill_at_checkpoint(cli(tmp_path / "killed", "run.max_steps=8", *RANKS), tmp_path / "killed", step=2)

    resumed = cli(tmp_path / "killed", "run.max_steps=8", "run.resume=true", *RANKS)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    expected, got = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == list(range(1, 9))
    resumed_from = int(out.split("(step ")[1].split(")")[0])
    assert 2 <= resumed_from <= 3  # so steps k+1 ... k+5 (at least) are compared
    for want, have in zip(expected[resumed_from:], got[resumed_from:]):
        assert _comparable(have) == _comparable(want)


def test_sigterm_finishes_the_step_saves_and_exits(cli, tmp_path):
    run = cli(tmp_path / "run", "run.max_steps=50", "run.save_every=100")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert run.poll() is None and time.monotonic() < deadline, run.stdout.read()
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 128 + signal.SIGTERM, out
    last = read_metrics(tmp_path / "run")[-1]["step"]
    assert "stopped by SIGTERM" in out and last < 50
    path, state = checkpoint.latest(tmp_path / "run")
    assert state["step"] == last and path.name == f"step-{last:06d}"
