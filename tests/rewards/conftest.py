"""The outer cap every attack test runs under: a sandbox bug must not be able to take the host down.

A fork bomb that got past a half-built sandbox once filled this machine's process table within
seconds (docs/notes.md#sandbox). So the test process moves itself into a fresh pids cgroup (and a memory
cgroup) before any attack runs, checks that the cap really stops a harmless forking program, and
only then lets the attacks start. Everything the tests spawn, sandbox servers included, inherits it.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import sandbox

PIDS_ROOT, MEMORY_ROOT = Path("/sys/fs/cgroup/pids"), Path("/sys/fs/cgroup/memory")
PIDS_MAX, MEMORY_MAX = 256, 6 << 30

# Forks children that each sleep a moment, until fork fails or 64 exist; prints how many it got.
_FORK_PROBE = """
import os, time
n = 0
for _ in range(64):
    try:
        if os.fork() == 0:
            time.sleep(0.5)
            os._exit(0)
        n += 1
    except OSError:
        break
print(n)
"""


@pytest.fixture(scope="module")  # not session: later tests (Ray, DeepSpeed) need more than the cap
def outer_cap():
    if os.geteuid() != 0 or not (PIDS_ROOT / "cgroup.procs").exists():
        pytest.skip("attack tests need root and the cgroup v1 pids controller for their outer cap")
    sandbox.close()  # servers started earlier are outside the cap: stop them
    groups = [PIDS_ROOT / f"cispo-test-{os.getpid()}", MEMORY_ROOT / f"cispo-test-{os.getpid()}"]
    pids, memory = groups
    for group in groups:
        group.mkdir(exist_ok=True)
    (memory / "memory.limit_in_bytes").write_text(str(MEMORY_MAX))
    for group in groups:
        (group / "cgroup.procs").write_text(str(os.getpid()))
    try:
        # The cap must work before anything dangerous runs: allow 16 more tasks, expect the probe to stop.
        (pids / "pids.max").write_text(str(int((pids / "pids.current").read_text()) + 16))
        got = int(subprocess.run([sys.executable, "-c", _FORK_PROBE], capture_output=True, text=True).stdout)
        assert got < 16, f"the pids cgroup did not stop a forking program ({got} forks)"
        (pids / "pids.max").write_text(str(PIDS_MAX))
        yield pids
    finally:
        sandbox.close()
        for group in groups:
            (group.parent / "cgroup.procs").write_text(str(os.getpid()))
        leftovers = [int(p) for p in (pids / "cgroup.procs").read_text().split()]
        for pid in leftovers:  # only processes this test session started can be in its cgroup
            os.kill(pid, 9)
        time.sleep(0.2)  # killed tasks leave the cgroup asynchronously; rmdir fails until they have
        for group in groups:
            group.rmdir()
        assert not leftovers, f"processes outlived the tests in the outer cap: {leftovers}"
