"""The sandbox, run for real: plain behaviour, load, and attacks (each under the outer cap, at each
level that contains them: bwrap and mountns, the levels accepted without an opt-in)."""
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from rewards import code, sandbox
from tests.rewards import conftest

LIMITS = {"timeout_s": 1.0, "memory_mb": 256}
STDIO_42 = {"inputs": [""], "outputs": ["42"], **LIMITS}


def own_sandbox_uids() -> set[int]:
    """The sandbox uids this process's fork-servers hold: each server's uid lock file is open here."""
    uids = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the fd listing itself, closed meanwhile
            continue
        if target.parent == sandbox.STATE_DIR and target.name.startswith("uid-"):
            uids.add(sandbox.UID_BASE + int(target.name.removeprefix("uid-").removesuffix(".lock")))
    return uids


def sandbox_uid_processes(grace_s: float = 2.0) -> list[int]:
    """Host processes running as a sandbox uid of this process's servers, still there after `grace_s`. Not
    every sandbox uid: the other xdist worker's (or another session's) sandboxes run programs of their own
    at the same moment. The grace: when a run's PID namespace ends, the kernel kills the processes left in it,
    and one it has not yet finished killing is still listed (seen once under load, in `make test`); an escaped
    process outlives the grace (the daemon test's writes its marker after 1 s, which that test checks)."""
    ours, deadline = own_sandbox_uids(), time.monotonic() + grace_s
    while True:
        found = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            try:
                uid = int(Path(f"/proc/{name}/status").read_text().split("\nUid:")[1].split()[0])
            except (OSError, IndexError):
                continue
            if uid in ours:
                found.append(int(name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def assert_host_fine():
    assert subprocess.run(["true"]).returncode == 0, "the host cannot start a process"
    assert not sandbox_uid_processes(), "sandboxed processes outlived their run"
    assert sandbox.run("print('still works')", **LIMITS).stdout == "still works\n"
    assert own_sandbox_uids(), "no fork-server's uid is held here: the leftover check would see nothing"


def test_program_io_status_and_cpu_time():
    r = sandbox.run("import sys\nprint(sys.stdin.read().upper(), end='')", "abc\n", **LIMITS)
    assert (r.status, r.stdout, r.exit_code) == ("ok", "ABC\n", 0)
    r = sandbox.run("raise ValueError('boom')", **LIMITS)
    assert r.status == "error" and r.exit_code == 1 and "ValueError: boom" in r.stderr
    r = sandbox.run("s = 0\nfor i in range(3_000_000): s += i\nprint(s)", **LIMITS)
    assert r.status == "ok" and 0.05 < r.cpu_s < 1.0


NAMESPACE_LEVELS = ("bwrap", "mountns")
NEEDS = {"bwrap": ("bwrap",), "mountns": ("unshare", "mount", "chroot", "setpriv")}


def force(level: str):
    """Run at `level` from now on (the tests' handle on a level; see rewards.sandbox.FORCE_ENV)."""
    if os.geteuid() != 0 or not all(map(shutil.which, NEEDS[level])):
        pytest.skip(f"{level} needs root and {', '.join(NEEDS[level])}")
    os.environ[sandbox.FORCE_ENV] = level
    sandbox.close()
    assert sandbox.isolation() == level


def unforce():
    os.environ.pop(sandbox.FORCE_ENV, None)
    sandbox.close()


def test_the_strongest_level_is_chosen():
    expected = next((lv for lv in NAMESPACE_LEVELS if os.geteuid() == 0 and all(map(shutil.which, NEEDS[lv]))), None)
    if expected is None:
        pytest.skip("neither namespace level can run here")
    assert sandbox.isolation() == expected


@pytest.mark.parametrize("level", NAMESPACE_LEVELS)
def test_what_a_program_sees_at_each_namespace_level(level):
    force(level)
    try:
        r = sandbox.run("import json, os\nprint(json.dumps([os.getuid(), sum(p.isdigit() for p in os.listdir('/proc')),"
                        " os.listdir('/'), dict(os.environ)]))", **LIMITS)
    finally:
        unforce()
    uid, processes, listing, environment = json.loads(r.stdout)
    assert sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_COUNT
    assert processes <= 3  # its own pid namespace: the server (and bwrap's init) and itself
    # The host's /etc, /home and /root stay out, but for the top of the interpreter's installation, bound read-only
    # (pyenv's lives under /root, a venv wherever it was made, the distribution's Python under /usr).
    shown, interpreter = set(listing), {Path(p).parts[1] for p in sandbox._installation()}
    assert interpreter <= shown and not shown & ({"etc", "home", "root"} - interpreter)
    assert "LANG" in environment and "HOME" not in environment  # a scrubbed environment


def test_weaker_levels_need_an_opt_in_and_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv(sandbox.FORCE_ENV, "uid")
    sandbox.close()
    try:
        with pytest.raises(sandbox.SandboxUnavailable, match=r"works here \(.*forces a weaker level") as err:
            sandbox.run("print(1)", **LIMITS)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="min_isolation 'jail'"):
            sandbox.isolation("jail")
        monkeypatch.setenv(sandbox.FORCE_ENV, "jail")
        sandbox.close()
        with pytest.raises(ValueError, match="not a sandbox level; valid: bwrap, mountns, uid, rlimits"):
            sandbox.isolation()
    finally:
        sandbox.close()


def test_harness_failure_is_sandbox_error_not_a_program_error():
    # A limit setrlimit cannot take fails the harness's own set-up, before the program starts.
    r = sandbox.run("print(1)", timeout_s=1.0, memory_mb=2**50)
    assert r.status == "sandbox_error" and "set up" in r.detail


def test_a_dead_server_is_replaced():
    sandbox.run("print(1)", **LIMITS)
    for server in sandbox._idle:
        server.proc.kill()
        server.proc.wait()
    assert sandbox.run("print(2)", **LIMITS).stdout == "2\n"


def test_twice_as_many_programs_as_cores_give_no_false_timeouts():
    # Each program needs ~0.3 s of CPU against a 2 s limit; 2x cores run at once, three rounds.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\nprint('done')"
    results = []

    def worker():
        for _ in range(3):
            results.append(sandbox.run(burn, timeout_s=2.0, memory_mb=256).status)

    threads = [threading.Thread(target=worker) for _ in range(2 * os.cpu_count())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == ["ok"] * len(results)


def test_a_timeout_is_retried_alone_and_then_stands():
    start = time.monotonic()
    r = sandbox.run("while True: pass", **LIMITS)
    assert r.status == "timeout" and r.cpu_s >= 0.8
    assert time.monotonic() - start < 2 * (sandbox.WALL_FACTOR * LIMITS["timeout_s"] + 2)


@pytest.mark.parametrize("level", NAMESPACE_LEVELS)
def test_files_a_program_leaves_outside_its_work_dir_do_not_reach_the_next_program(level):
    """The private /tmp lives as long as a fork-server: one program filling it (16 files at the 4 MiB
    file cap) once made every later program there that writes a file fail, a right answer scoring 0."""
    force(level)
    try:
        left = sandbox.run("open('/tmp/note', 'w').write('from the last program')\nn = 0\ntry:\n"
                           "    while True:\n        f = open(f'/tmp/fill{n}', 'wb')\n        n += 1\n"
                           "        for _ in range(4):\n            f.write(b'0' * 2**20)\n        f.close()\n"
                           "except OSError as e:\n    print(n, e)", **LIMITS)
        assert "No space left" in left.stdout
        writes = "open('scratch', 'wb').write(b'0' * 2**20)\nimport os\nprint(42, sorted(os.listdir('/tmp')))"
        for _ in range(3):  # one server, reused: the runs after the one that filled /tmp
            r = sandbox.run(writes, **LIMITS)
            assert r.status == "ok", r.stderr
            shown = eval(r.stdout.split(" ", 1)[1])
            assert "work" in shown and "note" not in shown and not any(n.startswith("fill") for n in shown)
        assert code.score(writes.replace(", sorted(os.listdir('/tmp'))", ""), STDIO_42) == 1.0
    finally:
        unforce()


def test_the_outer_cap_is_planned_on_cgroup_v1_and_v2_hosts(tmp_path):
    """Where the outer cap goes, on stand-in cgroup trees (directories holding the files the kernel shows):
    this host binds pids and memory to cgroup v1, and its init process keeps the v1 pids hierarchy alive when it
    is unmounted, so pids cannot be handed to cgroup v2 here. On a v2 host the cap's fork probe
    (tests/rewards/conftest.py) then checks the real thing before any attack runs."""
    def cgroup(path: Path, controllers: str, root: bool = False) -> Path:
        path.mkdir(parents=True)
        (path / "cgroup.controllers").write_text(controllers + "\n")
        (path / "cgroup.procs").write_text("")
        if not root:
            (path / "cgroup.type").write_text("domain\n")
        return path

    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("0::/user.slice/session-1.scope\n")
    (proc / "mountinfo").write_text(f"30 23 0:26 / {tmp_path / 'v2'} rw,nosuid - cgroup2 cgroup2 rw\n"
                                    f"31 23 0:27 / {tmp_path / 'v1'} rw - tmpfs tmpfs rw\n")
    own = conftest.own_cgroups(proc)
    root = cgroup(tmp_path / "v2", "cpu memory pids", root=True)
    scope = cgroup(cgroup(root / "user.slice", "memory pids") / "session-1.scope", "memory pids")
    assert own == {"v2": scope}
    limits = {"pids.max": str(conftest.PIDS_MAX), "memory.max": str(conftest.MEMORY_MAX)}
    # Beside our cgroup: its parent enables both controllers for its children.
    assert conftest.cap_plan("cap", own) == ([(root / "user.slice" / "cap", scope, limits)], "v2")
    # At the root, which may hold processes and still enable them.
    assert conftest.cap_plan("cap", {"v2": root}) == ([(root / "cap", root, limits)], "v2")
    assert (root / "cgroup.subtree_control").read_text() == "+pids +memory"
    with pytest.raises(LookupError, match=r"offers \['memory'\], not pids and memory"):
        conftest.cap_plan("cap", {"v2": cgroup(tmp_path / "nopids", "memory")})
    with pytest.raises(LookupError, match="parent is not visible here"):
        conftest.cap_plan("cap", {"v2": cgroup(tmp_path / "ns" / "container", "memory pids")})
    # cgroup v1 (this host): a child of our own cgroup in the pids and in the memory hierarchy.
    (proc / "cgroup").write_text("5:pids:/\n4:memory:/jobs/7\n0::/\n")
    (proc / "mountinfo").write_text(f"32 31 0:28 / {tmp_path / 'v1/pids'} rw - cgroup cgroup rw,pids\n"
                                    f"33 31 0:29 / {tmp_path / 'v1/memory'} rw - cgroup cgroup rw,memory\n")
    pids, memory = tmp_path / "v1/pids", tmp_path / "v1/memory/jobs/7"
    memory_v1 = (memory / "cap", memory, {"memory.limit_in_bytes": str(conftest.MEMORY_MAX)})
    assert conftest.cap_plan("cap", conftest.own_cgroups(proc)) == (
        [(pids / "cap", pids, {"pids.max": str(conftest.PIDS_MAX)}), memory_v1], "v1")
    # Each controller where the kernel binds it (booted with cgroup_no_v1=pids): memory on v1, pids on v2's root.
    (proc / "cgroup").write_text("4:memory:/jobs/7\n0::/\n")
    (proc / "mountinfo").write_text(f"33 31 0:29 / {tmp_path / 'v1/memory'} rw - cgroup cgroup rw,memory\n"
                                    f"34 23 0:30 / {tmp_path / 'hybrid'} rw - cgroup2 cgroup2 rw\n")
    hybrid = cgroup(tmp_path / "hybrid", "pids", root=True)
    assert conftest.cap_plan("cap", conftest.own_cgroups(proc)) == (
        [memory_v1, (hybrid / "cap", hybrid, {"pids.max": str(conftest.PIDS_MAX)})], "v1+v2")
    assert (hybrid / "cgroup.subtree_control").read_text() == "+pids"
    with pytest.raises(LookupError, match="no cgroup v1 pids hierarchy and no cgroup2 mount"):
        conftest.cap_plan("cap", {"memory": memory})


# ---- attacks: each under the outer cap, each ending with the host unharmed and a score of 0 ----

@pytest.fixture(scope="module", params=NAMESPACE_LEVELS)
def level(request, outer_cap):
    force(request.param)
    yield request.param
    unforce()


@pytest.fixture
def attack(level):
    """Runs an attack program under the outer cap at `level` (`limits` change LIMITS), then scores it as a
    code answer; checks the run stayed in its limits and the host."""
    def run(program: str, **limits):
        limits = {**LIMITS, **limits}
        start = time.monotonic()
        r = sandbox.run(program, **limits)
        elapsed = time.monotonic() - start
        assert elapsed < 2 * (sandbox.WALL_FACTOR * limits["timeout_s"] + 2) + 5, f"took {elapsed:.1f}s"
        assert code.score(f"```python\n{program}\n```", {**STDIO_42, **limits}) == 0.0
        assert_host_fine()
        return r
    return run


def test_fork_bomb(attack):
    # Up to NPROC processes spin on a failing fork until each has used its CPU limit or the wall limit ends them
    # all: both cores busy throughout, so a quarter of LIMITS' CPU second (wall 3 s, not 6 s) is enough to fill
    # the uid's share of the process table and be cleaned up after.
    r = attack("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout_s=0.25)
    assert r.status in ("timeout", "error")


def test_20_gb_allocation(attack):
    r = attack("x = bytearray(20 * 2**30)\nprint('allocated')")
    assert r.status == "error" and "MemoryError" in r.stderr


def test_filling_the_disk_with_one_file_and_with_many(attack):
    before = shutil.disk_usage("/").used
    big = attack("f = open('big', 'wb')\nwhile True:\n    f.write(b'0' * 2**20)")
    assert big.status == "error"
    many = attack("n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'0' * 2**16)\n"
                  "        n += 1\nexcept OSError as e:\n    print(n, e)")
    files = int(many.stdout.split()[0])
    assert files <= sandbox.TMPFS_BYTES // 2**16 and "No space left" in many.stdout
    assert shutil.disk_usage("/").used - before < 50 << 20  # nothing reached the host's disk


def test_infinite_loop(attack):
    assert attack("while True: pass", timeout_s=0.25).status == "timeout"  # CPU-bound: a quarter second shows it


def test_connecting_to_a_listener_on_the_host(attack):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    r = attack(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
        listener.accept()
    listener.close()
    assert r.status == "error" and "connected" not in r.stdout


def test_reading_a_world_readable_host_file(attack):
    secret_dir = Path(f"/tmp/cispo-secret-{os.getpid()}")
    secret_dir.mkdir(mode=0o755)
    try:
        (secret_dir / "secret.txt").write_text("TOP-SECRET")
        (secret_dir / "secret.txt").chmod(0o644)
        r = attack(f"print(open('{secret_dir}/secret.txt').read())")
    finally:
        shutil.rmtree(secret_dir)
    assert r.status == "error" and "TOP-SECRET" not in r.stdout


def test_reading_the_parents_environment(attack, monkeypatch):
    monkeypatch.setenv("CISPO_TEST_SECRET", "s3cr3t-token")
    sandbox.close()  # the next server starts while the secret is set
    r = attack("import os\nprint(dict(os.environ))\nfor p in os.listdir('/proc'):\n"
               "    try:\n        print(open(f'/proc/{p}/environ').read())\n    except Exception:\n        pass")
    assert "s3cr3t-token" not in r.stdout


def test_killing_the_parent_and_everything(attack):
    canary = subprocess.Popen(["sleep", "30"])
    try:
        r = attack("import os, signal\nfor target in (os.getppid(), 1, -1):\n    try:\n"
                   "        os.kill(target, signal.SIGKILL)\n    except OSError as e:\n        print(target, e)")
        assert canary.poll() is None, "the canary outside the sandbox was killed"
        assert "Operation not permitted" in r.stdout  # the server is root: out of reach
    finally:
        canary.kill()
        canary.wait()


def test_a_daemon_that_would_outlive_the_run(attack):
    marker = Path(f"/tmp/cispo-daemon-{os.getpid()}")
    r = attack(f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        time.sleep(1)\n        open('{marker}', 'w')\n    os._exit(0)\nprint('parent done')")
    assert r.status == "ok"
    time.sleep(1.5)
    assert not marker.exists() and not sandbox_uid_processes()


def test_200_mb_output_flood(attack):
    r = attack("import sys\nchunk = 'x' * 2**20\nfor _ in range(200):\n    sys.stdout.write(chunk)")
    assert r.status == "error" and len(r.stdout) <= sandbox.OUT_CAP


@pytest.mark.parametrize("trick", ["import sys\nsys.exit(0)", "import os\nos._exit(0)",
                                   "import atexit, os\natexit.register(lambda: os._exit(0))\nraise SystemExit(1)"])
def test_exit_code_tricks(attack, trick):
    attack(trick)  # the score of 0 is checked inside
    fn_tests = {"fn_name": "answer", "inputs": [[]], "outputs": [42]}
    assert code.score(f"def answer():\n    {trick.replace(chr(10), '; ')}", fn_tests) == 0.0


def test_an_object_equal_to_everything(attack):
    always = "class Any:\n    def __eq__(self, other):\n        return True\n"
    attack(always + "print(Any())")
    assert code.score(always + "def answer():\n    return Any()", {"fn_name": "answer", "inputs": [[]], "outputs": [42]}) == 0.0
    humaneval = {"prompt": "def answer():\n    '''The answer.'''\n", "entry_point": "answer",
                 "test": "def check(candidate):\n    assert candidate() == 42\n"}
    assert code.score(always + "def answer():\n    return Any()", humaneval) == 0.0
    assert code.score("def answer():\n    return 42", humaneval) == 1.0
