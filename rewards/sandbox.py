"""Run untrusted programs: `run(program, stdin, *, timeout_s, memory_mb) -> SandboxResult`.

Layers (DESIGN §6), strongest first; the first level whose probe runs a program is used, and
`isolation()` names it so the run's metrics can record it:

- "bwrap":  bubblewrap with fresh pid, net, ipc and uts namespaces, a mount namespace showing only
            /usr and the Python installation read-only, a private size-capped tmpfs /tmp, and a
            cleared environment; plus everything below.
- "uid":    no namespaces; a root fork-server drops each program to an unprivileged host uid.
- "rlimits": not root, so no uid switch; limits and leftover killing only.

Every level: rlimits (CPU time, address space, file size = output cap, open files, processes),
a fresh working dir per run, a scrubbed environment, and every leftover process of the worker's uid
killed after the run. Each worker (one fork-server, see `sandbox_server.py`) owns one host uid,
claimed with a lock file, so RLIMIT_NPROC counts only its own programs and killing by uid touches
nothing else. Root is exempt from RLIMIT_NPROC and so is a uid that only looks non-root inside a
user namespace; that is why the uid switch is real and happens in the server, not in bwrap.
"""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

UID_BASE, UID_COUNT = 3_000_000, 256  # host uids with no passwd entry, one per fork-server
NPROC = 64          # per worker uid; a fork bomb stops here
OUT_CAP = 4 << 20   # stdout bytes (also RLIMIT_FSIZE); a flood is killed by SIGXFSZ
ERR_CAP = 16 << 10  # the tail of stderr that comes back
TMPFS_BYTES = 64 << 20  # the program's writable /tmp
IO_TMPFS_BYTES = 3 * OUT_CAP + (64 << 20)  # stdout + stderr + stdin
WALL_FACTOR = 4     # wall limit = 4 x CPU limit + 2 s: only for programs that sleep (DESIGN §6: judge CPU)
STATE_DIR = Path(tempfile.gettempdir()) / "cispo-sandbox"
SERVER_SRC = (Path(__file__).parent / "sandbox_server.py").read_text()
# The server needs these to create each run's dir, switch uid and kill leftovers; programs get none.
SERVER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")


@dataclass
class SandboxResult:
    status: str  # ok | error | timeout | sandbox_error
    stdout: str
    stderr: str
    exit_code: int | None
    cpu_s: float
    detail: str = ""


class _HarnessError(Exception):
    pass


class SandboxFailure(RuntimeError):
    """Raised by scorers when the harness failed, not the program: the pool reports `sandbox_error`."""


def _bwrap_prefix() -> list[str]:
    args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp",
            # The program's stdin/stdout/stderr files, apart so that a full /tmp cannot cut the output.
            "--perms", "0700", "--size", str(IO_TMPFS_BYTES), "--tmpfs", "/io", "--cap-drop", "ALL"]
    for cap in SERVER_CAPS:
        args += ["--cap-add", cap]
    args += ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):  # merged-/usr symlinks, or real dirs on older systems
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for prefix in sorted({sys.base_prefix, sys.prefix}):  # the interpreter and, for a venv, its packages
        if prefix.startswith("/usr/"):
            continue
        for parent in reversed(Path(prefix).parents[:-1]):  # bwrap would copy /root's 0700
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", prefix, prefix]
    return args


class _Server:
    """One fork-server process, its uid, and the framed pipe to it."""

    # No --die-with-parent or PDEATHSIG: those fire when the *thread* that started the server ends.
    # A server exits when its pipe closes, which happens when this process dies, however it dies.
    def __init__(self, level: str):
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        self.uid, self._uid_lock = _claim_uid()
        self.pid_owner = os.getpid()
        self._root = None
        if level == "bwrap":
            prefix, work, io = _bwrap_prefix(), "/tmp/work", "/io"
        else:
            self._root = tempfile.mkdtemp(prefix="cispo-sbx-")
            os.chmod(self._root, 0o711)  # the worker uid may enter its work dir, not list the root
            prefix, work, io = [], f"{self._root}/work", f"{self._root}/io"
        cfg = {"uid": self.uid if level != "rlimits" else os.getuid(), "work": work, "io": io, "nproc": NPROC,
               "out_cap": OUT_CAP, "err_cap": ERR_CAP}
        self._stderr = tempfile.TemporaryFile()
        info_r, info_w = os.pipe()  # bwrap reports the host pid of the namespace's init here
        if level == "bwrap":
            prefix[1:1] = ["--info-fd", str(info_w)]
        self.proc = subprocess.Popen(prefix + [sys.executable, "-I", "-c", SERVER_SRC, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True,
                                     pass_fds=[info_w])
        os.close(info_w)
        self._init_pid = None
        try:
            self._recv(deadline_s=30)  # the "ready" line; a server that cannot start fails here
            # Killing a pid namespace's init kills everything in it; killing bwrap alone would not.
            self._init_pid = json.loads(os.read(info_r, 4096)).get("child-pid") if level == "bwrap" else None
        except BaseException:
            self.close()
            raise
        finally:
            os.close(info_r)

    def call(self, req: dict, deadline_s: float) -> dict:
        data = json.dumps(req).encode()
        try:
            self.proc.stdin.write(struct.pack(">I", len(data)) + data)
            self.proc.stdin.flush()
        except OSError as exc:
            raise _HarnessError(f"sandbox server gone: {exc}; {self._log()}") from None
        return self._recv(deadline_s)

    def _recv(self, deadline_s: float) -> dict:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], deadline_s)[0]:
            raise _HarnessError(f"sandbox server silent for {deadline_s:.0f}s")
        header = self.proc.stdout.read(4)
        if len(header) < 4:
            raise _HarnessError(f"sandbox server exited ({self.proc.poll()}): {self._log()}")
        return json.loads(self.proc.stdout.read(struct.unpack(">I", header)[0]))

    def _log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-2000:].decode(errors="replace")

    def close(self) -> None:
        if self.pid_owner != os.getpid():  # inherited through fork: the parent still uses it
            return
        if self._init_pid:
            os.kill(self._init_pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait()
        self._uid_lock.close()
        if self._root:
            shutil.rmtree(self._root, ignore_errors=True)


def _claim_uid():
    """A host uid no other live worker holds (lock files survive nothing: a dead worker frees its uid)."""
    for i in range(UID_COUNT):
        f = open(STATE_DIR / f"uid-{i}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return UID_BASE + i, f
        except BlockingIOError:
            f.close()
    raise _HarnessError(f"all {UID_COUNT} sandbox uids are in use")


_level: str | None = None
_idle: list[_Server] = []
_lock = threading.Lock()


def _probe() -> str:
    """The strongest level that runs a program correctly here."""
    levels = (["bwrap"] if shutil.which("bwrap") and os.geteuid() == 0 else []) + \
             (["uid"] if os.geteuid() == 0 else []) + ["rlimits"]
    for level in levels:
        try:
            server = _Server(level)
            reply = server.call(_request("print(6 * 7)", "", 5.0, 256), deadline_s=30)
        except (_HarnessError, OSError):
            continue
        if reply["status"] == "ok" and reply["stdout"] == "42\n":
            _idle.append(server)
            return level
        server.close()
    raise RuntimeError("no sandbox level works on this machine")


def isolation() -> str:
    """The isolation level in use: 'bwrap', 'uid' or 'rlimits' (probed on first use)."""
    global _level
    with _lock:
        if _level is None:
            _level = _probe()
    return _level


def _request(program: str, stdin: str, timeout_s: float, memory_mb: int) -> dict:
    return {"program": program, "stdin": stdin, "cpu_s": timeout_s, "wall_s": WALL_FACTOR * timeout_s + 2,
            "memory_mb": memory_mb}


def _run_once(req: dict) -> SandboxResult:
    level = isolation()
    with _lock:
        server = _idle.pop() if _idle else None
    try:
        server = server if server and server.pid_owner == os.getpid() else _Server(level)
        reply = server.call(req, deadline_s=req["wall_s"] + 10)
    except (_HarnessError, OSError) as exc:
        if server:
            server.close()
        return SandboxResult("sandbox_error", "", "", None, 0.0, str(exc))
    with _lock:
        _idle.append(server)
    return SandboxResult(**reply)


class _Gate:
    """Cross-process "alone": runs hold a shared lock, a retry holds it exclusively. The turnstile lock
    stops new runs from slipping in while a retry waits, so the retry cannot starve."""

    def __init__(self):
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        self.turnstile = open(STATE_DIR / "turnstile.lock", "w")
        self.runs = open(STATE_DIR / "runs.lock", "w")

    def enter(self, alone: bool) -> None:
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        fcntl.flock(self.runs, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def leave(self) -> None:
        fcntl.flock(self.runs, fcntl.LOCK_UN)
        fcntl.flock(self.turnstile, fcntl.LOCK_UN)


_gates = threading.local()  # flock is per open file: each thread needs its own to share the lock


def run(program: str, stdin: str = "", *, timeout_s: float, memory_mb: int) -> SandboxResult:
    """Run a Python program on `stdin` under every isolation layer available.

    `timeout_s` limits CPU time; a timeout is re-run once alone before it stands, so load cannot
    fail a program. A harness failure is retried once on a fresh server, then reported as
    `sandbox_error`, which the trainer should drop rather than score.
    """
    gate = getattr(_gates, "gate", None) or _Gate()
    _gates.gate = gate
    req = _request(program, stdin, timeout_s, memory_mb)
    result = None
    for alone in (False, True):
        gate.enter(alone)
        try:
            result = _run_once(req)
            if result.status == "sandbox_error":
                result = _run_once(req)
        finally:
            gate.leave()
        if result.status != "timeout":
            break
    return result


def close() -> None:
    """Stop every idle fork-server of this process (they also die with it)."""
    with _lock:
        while _idle:
            _idle.pop().close()
