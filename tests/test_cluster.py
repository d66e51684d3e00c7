"""A 2-node Ray cluster on one machine: rollout workers and trainer ranks land on different nodes."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_nodes(temp_dir: Path) -> None:
    # Not `ray stop`: that would also stop the test session's own Ray instance.
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(temp_dir).encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


# Slow: two `ray start` nodes and a run across them (25 s idle). The quick loop runs the same `cispo train` from the
# warm start on one node (test_checkpoint's SIGTERM test); only the placement by node resource is this test's own.
@pytest.mark.slow
def test_tiny_recipe_on_two_nodes(warm_arith, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # Short paths: Ray's unix sockets live under the temp dir, and socket paths max out at 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="cispo-", dir="/tmp"))
    head_dir, node_dir = short / "h", short / "n"
    port = _free_port()
    common = ["--num-cpus=2", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                        '--resources={"trainer": 2}', f"--temp-dir={head_dir}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", '--resources={"rollout": 2}',
                        f"--temp-dir={node_dir}", *common], env=env, check=True, capture_output=True, timeout=120)
        out = subprocess.run(
            [sys.executable, "-m", "cispo.cli", "train", "recipes/tiny-arith.yaml", f"run.dir={tmp_path / 'run'}",
             "data.digits=1", "data.eval_size=10", "data.prompts_per_step=4", "rollout.n_samples=4", "sft.steps=0",
             f"model.path={warm_arith}", "run.max_steps=2", "run.threads=1", "wandb.mode=disabled",
             "resources.colocate=false", "resources.rollout.node_resource=rollout",
             "resources.trainer.node_resource=trainer"],
            cwd=REPO, env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        placed = re.search(r"rollout workers on nodes \['(\w+)'\], trainer ranks on nodes \['(\w+)'\]", out.stdout)
        assert placed and placed.group(1) != placed.group(2), out.stdout[-2000:]
        assert (tmp_path / "run" / "summary.json").exists()
    finally:
        _kill_nodes(short)
        shutil.rmtree(short, ignore_errors=True)
