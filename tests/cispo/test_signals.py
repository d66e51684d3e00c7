"""A signal to the whole process group, as Ctrl-C in a terminal, `timeout` and SLURM's scancel or preemption
send it, ends a run with a checkpoint in every phase of a step, and resuming gives the rows of a run that
was never stopped. A chain of runs (each resuming the last) is stopped in each phase, by SIGTERM and by SIGINT.
The runs hold rollouts across steps when stopped (partial rollouts: responses paused mid-way; rollout.overlap:
the next step collected ahead) and draw from a streamed file (a position beyond the step): none of it is lost,
and no prompt is skipped or seen twice. (tiny-arith colocates its replica in its one trainer rank, so the step
collected ahead and the step training take turns in that rank instead of running at once; the loop holds,
checkpoints and restores the step collected ahead the same way either way.)

Each run is a real `cispo train` in its own session with its own local Ray (the case that lost runs: the
Ray head `ray.init` starts, and the scoring processes, are in the controller's process group). The phase
a signal lands in is known from the console: every phase of an RL step announces itself as it starts
("step 3: reward"), and the signal goes to the group as soon as that line is the newest step line.

The two signals take one path: the controller handles both with one handler (cispo.run.StopRequest), and every
other process of the run blocks both (Ray's daemons and workers, the scorers: cispo.run.start_ray,
rewards.pool.signals_left_to_parent). Each run checks the second half on every thread of its session once its
roles are up, so the chain needs each phase once and each signal twice rather than every pair (which took 6 runs).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cispo import checkpoint
from cispo.run import ROLLOUTS
from cispo.data import arith_problems
from cispo.metrics import read_metrics
from tests.conftest import REPO

pytestmark = pytest.mark.slow

MAX_STEPS = 14
# Each run starts from the session's shared warm start (tests/conftest.py), so no run spends time on SFT.
ARGS = ["data.digits=1", "data.eval_size=10", "data.prompts_per_step=4", "rollout.n_samples=4", "sft.steps=0",
        "run.save_every=100", "run.threads=1", "optim.lr=1e-4", "wandb.mode=disabled", "reward.num_workers=2",
        # Four stops need four steps; a phase the poll misses (a loaded machine: reward phases last ~20 ms)
        # moves its stop to a later step, so the chain has room to spare: with six stops CI ran out of steps at 8
        # (the run ended before its last stop) and, at 12, its last stop landed in the last step, whose final
        # evaluation a stop skips, so the resumed rows lacked it.
        f"run.max_steps={MAX_STEPS}",
        # Responses of up to 12 tokens in chunks of 6: most pause once; with overlap, trained up to 2 versions old.
        "rollout.partial_tokens=6", "rollout.overlap=true", "rollout.max_staleness=2",
        "algorithm.dynamic_sampling=false", "data.source=jsonl", "data.streaming=true"]
# Every phase, each signal twice (the train phase, ranks and collectives, by both), one after the other in one
# chain of runs: each run resumes the one before.
STOPS = [(signal.SIGTERM, "rollout"), (signal.SIGINT, "reward"), (signal.SIGTERM, "train"), (signal.SIGINT, "train")]
STOP_SIGNALS = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))  # their bits in /proc's SigBlk mask


class Run:
    """`cispo train` as a session leader, so that its process group is its own and not the test's."""

    def __init__(self, run_dir, model_dir, data, *extra):
        self.log = open(f"{run_dir}.{time.monotonic_ns()}.log", "w+")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, started by the run
        self.proc = subprocess.Popen([sys.executable, "-m", "cispo.cli", "train", "recipes/tiny-arith.yaml", *ARGS,
                                      f"model.path={model_dir}", f"run.dir={run_dir}",
                                      f"data.path={data}/train.jsonl", f"data.eval_path={data}/eval.jsonl", *extra], cwd=REPO, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def wait_for_phase(self, phase: str, first_step: int, timeout_s: float = 600) -> int:
        """The step at which `phase` is the newest step line on the console (at or after `first_step`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the run ended before a {phase} phase at step {first_step} or later:\n" \
                                             + self.output()
            lines = [line for line in self.output().splitlines() if line.startswith("step ")]
            if lines and lines[-1].endswith(f": {phase}"):
                step = int(lines[-1].split()[1].rstrip(":"))
                if step >= first_step:
                    return step
            time.sleep(0.005)
        raise AssertionError(f"no {phase} phase within {timeout_s}s:\n{self.output()}")

    def finish(self, timeout_s: float = 600) -> int:
        return self.proc.wait(timeout=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()

    def signal_takers(self) -> list[str]:
        """The processes of the run's session, the controller aside, with a thread that does not block SIGINT or
        SIGTERM (a signal to a process goes to any thread that does not block it)."""
        takers = []
        for pid in self.session_processes():
            if pid == self.proc.pid:
                continue
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    status = open(f"/proc/{pid}/task/{tid}/status").read()
                    blocked = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M)[1], 16)
                    if blocked & STOP_SIGNALS != STOP_SIGNALS:
                        takers.append(open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:120])
                        break
            except (FileNotFoundError, ProcessLookupError):  # it ended while we looked
                pass
        return takers

    def session_processes(self) -> list[int]:
        """Processes still in the run's session (the controller's children: Ray's, the scorers)."""
        left = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.getsid(int(pid)) == self.proc.pid:
                    left.append(int(pid))
            except ProcessLookupError:
                pass
        return left


def _comparable(rows):
    return [{k: v for k, v in row.items() if not k.startswith("time_")} for row in rows]


@pytest.fixture(scope="module")
def arith_files(tmp_path_factory):
    """tiny-arith's 1-digit problems as JSONL files (90 to train on, streamed; 10 held out) in a directory."""
    path, problems = tmp_path_factory.mktemp("arith-data"), arith_problems(1)
    for name, rows in (("train", problems[:90]), ("eval", problems[90:])):
        (path / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": p.text, "answer": p.answer}) + "\n"
                                                    for p in rows))
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, warm_arith, arith_files):
    run_dir = tmp_path_factory.mktemp("signals") / "whole"
    with Run(run_dir, warm_arith, arith_files) as run:
        assert run.finish() == 0, run.output()
    return read_metrics(run_dir)


def test_group_signal_in_each_phase_checkpoints_and_resumes_to_the_same_rows(uninterrupted, warm_arith, arith_files,
                                                                             tmp_path):
    run_dir, step, held, landed = tmp_path / "run", 0, [], []
    for n, (sig, phase) in enumerate(STOPS):
        with Run(run_dir, warm_arith, arith_files, *(["run.resume=true"] if n else [])) as run:
            run.wait_for_phase("rollout", first_step=step + 1)  # every role of the run is up
            takers = run.signal_takers()
            seen = run.wait_for_phase(phase, first_step=step + 1)
            os.killpg(run.proc.pid, sig)
            code, out = run.finish(), run.output()
            deadline = time.monotonic() + 30
            while run.session_processes() and time.monotonic() < deadline:
                time.sleep(0.2)
            left = run.session_processes()
        assert not takers, f"processes of the run that a group {sig.name} reaches, beside the controller: {takers}"
        assert code == 128 + sig, out
        # Step t + 1 rolls out and is scored while step t trains (rollout.overlap), so a signal in those
        # phases of step t + 1 ends step t, unless it landed as step t + 1 began.
        step = int(re.search(rf"stopped by {sig.name} after step (\d+)", out)[1])
        assert step == seen if phase == "train" else seen - 1 <= step <= seen, out
        # The controller took the signal during that step, finished the step, saved it, and nothing crashed.
        assert out.index(f"step {seen}: {phase}") < out.index(f"{sig.name}: finishing step") \
            < out.index(f"step {step}/") < out.index(f"stopped by {sig.name} after step {step}"), out
        assert not any(e in out for e in ("Traceback", "BrokenPipeError", "ConnectionResetError", "GCS")), out
        assert checkpoint.latest(run_dir)[1]["step"] == step
        assert not left, f"processes of the run left behind: {left}"  # the controller shut its children down
        held.append((checkpoint.latest(run_dir)[0] / ROLLOUTS).exists())
        landed.append((sig.name, phase, seen, step))
    assert all(held)  # every stop held paused responses or the step collected ahead, and lost neither
    assert step < MAX_STEPS, f"the last stop landed in the last step: the chain needs more room {landed}"
    with (run_dir / "metrics.jsonl").open("a") as f:  # and a crash had torn the last row as it was written
        f.write('{"step": %d, "reward_mean": 0.' % (step + 1))
    with Run(run_dir, warm_arith, arith_files, "run.resume=true") as final:
        assert final.finish() == 0, final.output()
        assert f"resumed from {run_dir / 'ckpt' / f'step-{step:06d}'} (step {step})" in final.output()
        assert "dropped a torn last line" in final.output()
    rows = read_metrics(run_dir)
    # The same prompts in the same steps (prompts_digest, in order): none skipped or seen twice across the resumes.
    assert [r.get("prompts_digest") for r in rows] == [r.get("prompts_digest") for r in uninterrupted]
    digests = [r["prompts_digest"] for r in uninterrupted if "prompts_digest" in r]
    assert len(digests) >= 6 and len(set(digests)) == len(digests)
    assert any(r.get("staleness_2") for r in rows) and any(r.get("partial_paused_groups") for r in rows)
    assert _comparable(rows) == _comparable(uninterrupted)
