"""The outer cap every attack test runs under: a sandbox bug must not be able to take the host down.

A fork bomb that got past a half-built sandbox once filled this machine's process table within
seconds (docs/notes.md#sandbox). So the test process moves itself into a fresh pids cgroup (and a memory
cgroup) before any attack runs, checks that the cap really stops a harmless forking program, and
only then lets the attacks start. Everything the tests spawn, sandbox servers included, inherits it.

The cap is built on cgroup v1 (a pids and a memory hierarchy, as on hybrid hosts) or on cgroup v2 (one
group with both controllers, beside the test's own cgroup, whose parent enables them for its children:
v2 forbids turning controllers on below a cgroup that holds processes), or on both where the kernel binds
one controller to each.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards import sandbox

PIDS_MAX, MEMORY_MAX = 256, 6 << 30
CAP = {"pids": PIDS_MAX, "memory": MEMORY_MAX}
V1_FILES = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}  # each controller's limit file
V2_FILES = {"pids": "pids.max", "memory": "memory.max"}

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


def own_cgroups(proc: Path = Path("/proc/self")) -> dict[str, Path]:
    """This process's cgroup directory in each mounted hierarchy, by controller ("pids", "memory") for
    v1 and "v2" for the unified one, from `proc`/mountinfo and `proc`/cgroup."""
    paths = {}
    for line in (proc / "cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        paths[controllers or "v2"] = path
    mounts = {}
    for line in (proc / "mountinfo").read_text().splitlines():
        fields, (fstype, _, options) = line.split(" - ")[0].split(), line.split(" - ")[1].split()
        root, point = fields[3], fields[4]
        keys = ["v2"] if fstype == "cgroup2" else [o for o in options.split(",") if o in ("pids", "memory")]
        for key in keys:
            if fstype in ("cgroup", "cgroup2") and paths.get(key, "").startswith(root):
                mounts[key] = Path(point) / paths[key][len(root):].lstrip("/")
    return mounts


def cap_plan(name: str, own: dict[str, Path]) -> tuple[list[tuple[Path, Path, dict[str, str]]], str]:
    """The cap's cgroups, given `own_cgroups()`: (new group, the cgroup to return to, its limit files), and
    how it is built: "v1", "v2", or "v1+v2". Each controller goes where the kernel binds it: a v1 hierarchy
    when one is mounted, else the unified one (a host booted with cgroup_no_v1=pids has pids on v2 and memory
    on v1). Raises LookupError, naming what is missing, when the cap cannot be built."""
    on_v1 = [c for c in ("pids", "memory") if c in own]
    plan = [(own[c] / name, own[c], {V1_FILES[c]: str(CAP[c])}) for c in on_v1]
    on_v2 = [c for c in ("pids", "memory") if c not in on_v1]
    if not on_v2:
        return plan, "v1"
    if "v2" not in own:
        raise LookupError(f"no cgroup v1 {' or '.join(on_v2)} hierarchy and no cgroup2 mount")
    group = own["v2"]
    available = set((group / "cgroup.controllers").read_text().split())
    if not set(on_v2) <= available:
        raise LookupError(f"cgroup2 at {group} offers {sorted(available)}, not {' and '.join(on_v2)}")
    if (group / "cgroup.type").exists():  # not the root: a sibling, under the parent that enables them
        parent = group.parent
        if not (parent / "cgroup.procs").exists():
            raise LookupError(f"cgroup2 at {group}: its parent is not visible here (a cgroup namespace)")
    else:  # the root holds processes and may still enable controllers for its children
        parent = group
        (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in on_v2))
    plan.append((parent / name, group, {V2_FILES[c]: str(CAP[c]) for c in on_v2}))
    return plan, "v1+v2" if on_v1 else "v2"


@pytest.fixture(scope="module")  # not session: later tests (Ray, DeepSpeed) need more than the cap
def outer_cap():
    if os.geteuid() != 0:
        pytest.skip("attack tests need root for their outer cap (a pids cgroup)")
    try:
        groups, _ = cap_plan(f"cispo-test-{os.getpid()}", own_cgroups())
    except LookupError as e:
        pytest.skip(f"attack tests need a pids and memory cgroup for their outer cap: {e}")
    sandbox.close()  # servers started earlier are outside the cap: stop them
    pids = next(group for group, _, limits in groups if "pids.max" in limits)
    for group, _, limits in groups:
        group.mkdir(exist_ok=True)
        for limit, value in limits.items():
            if limit != "pids.max":
                (group / limit).write_text(value)
    try:
        for group, _, _ in groups:
            (group / "cgroup.procs").write_text(str(os.getpid()))
        # The cap must work before anything dangerous runs: allow 16 more tasks, expect the probe to stop.
        (pids / "pids.max").write_text(str(int((pids / "pids.current").read_text()) + 16))
        got = int(subprocess.run([sys.executable, "-c", _FORK_PROBE], capture_output=True, text=True).stdout)
        assert got < 16, f"the pids cgroup did not stop a forking program ({got} forks)"
        (pids / "pids.max").write_text(str(PIDS_MAX))
        yield pids
    finally:
        sandbox.close()
        for _, home, _ in groups:
            (home / "cgroup.procs").write_text(str(os.getpid()))
        leftovers = [int(p) for p in (pids / "cgroup.procs").read_text().split()]
        for pid in leftovers:  # only processes this test session started can be in its cgroup
            os.kill(pid, 9)
        time.sleep(0.2)  # killed tasks leave the cgroup asynchronously; rmdir fails until they have
        for group, _, _ in groups:
            group.rmdir()
        assert not leftovers, f"processes outlived the tests in the outer cap: {leftovers}"
