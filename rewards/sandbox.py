"""Run untrusted programs: `run(program, stdin, *, timeout_s, memory_mb) -> SandboxResult`.

Levels (docs/notes.md#sandbox), strongest first; `isolation()` names the one in use, so the run's metrics can
record it:

- "bwrap":   bubblewrap with fresh pid, net, ipc and uts namespaces, a mount namespace whose new root
             shows only /usr and the Python installation read-only, a private size-capped tmpfs
             /tmp, and a cleared environment; the fork-server keeps only SERVER_CAPS; plus "uid".
- "mountns": the same, built as root with util-linux (unshare, mount, chroot, setpriv), for machines
             without bubblewrap: the host's files, /tmp, processes and network are out of reach.
- "uid":     no namespaces; a root fork-server drops each program to an unprivileged host uid. The
             program can read world-readable host files and write to the host's /tmp: accepted
             only with `min_isolation="uid"` (RewardConfig.min_isolation).
- "rlimits": not root, so no uid switch; limits and leftover killing only (`min_isolation="rlimits"`).

A level is used only after its probe passed on this machine: through the call harness, a program
imports stdlib modules the fork-server did not preload, and tries to read a host file and write
outside its work dir where the level promises it cannot. An interpreter under a directory the
program's uid cannot read (pyenv under /root) passes a probe that imports nothing, then fails every
real program (docs/notes.md#sandbox); a level whose probe fails is refused, never used.

Every level: rlimits (CPU time, address space, file size = output cap, open files, processes),
a fresh working dir per run, a scrubbed environment, and every leftover process of the worker's uid
killed after the run. Each worker (one fork-server, see `sandbox_server.py`) owns one host uid,
claimed with a lock file, so RLIMIT_NPROC counts only its own programs and killing by uid touches
nothing else. Root is exempt from RLIMIT_NPROC and so is a uid that only looks non-root inside a
user namespace; that is why the uid switch is real and happens in the server, not in bwrap.
"""
from __future__ import annotations

import ast
import fcntl
import json
import os
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

LEVELS = ("bwrap", "mountns", "uid", "rlimits")  # strongest first
FORCE_ENV = "CISPO_SANDBOX_LEVEL"  # probe only this level (tests; pinning a level)
UID_BASE, UID_COUNT = 3_000_000, 256  # host uids with no passwd entry, one per fork-server
NPROC = 64          # per worker uid; a fork bomb stops here
OUT_CAP = 4 << 20   # stdout bytes (also RLIMIT_FSIZE); a flood is killed by SIGXFSZ
ERR_CAP = 16 << 10  # the tail of stderr that comes back
TMPFS_BYTES = 64 << 20  # the program's writable /tmp
IO_TMPFS_BYTES = 3 * OUT_CAP + (64 << 20)  # stdout + stderr + stdin
WALL_FACTOR = 4     # wall limit = 4 x CPU limit + 2 s: only for programs that sleep (docs/notes.md#sandbox: judge CPU)
STATE_DIR = Path(tempfile.gettempdir()) / "cispo-sandbox"
SERVER_SRC = (Path(__file__).parent / "sandbox_server.py").read_text()
# The server needs these to create each run's dir, switch uid and kill leftovers; programs get none.
SERVER_CAPS = ("CAP_SETUID", "CAP_SETGID", "CAP_KILL", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER")
MOUNTNS_TOOLS = ("unshare", "mount", "chroot", "setpriv")
CALL_MARK = "\n\x1e cispo-result \x1e"  # the call harness prints the result after the last one
_CALL = """
import ast as _ast, sys as _sys
_args = _ast.literal_eval(_sys.stdin.read())
_fn = (Solution().{name} if "Solution" in globals() and hasattr(Solution, "{name}") else {name})
_result = _fn(*_args)
_sys.stdout.write({mark!r} + repr(_result))
"""


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


class SandboxUnavailable(SandboxFailure):
    """No isolation level at least as strong as the one asked for works on this machine."""


def call_program(program: str, name: str) -> str:
    """`program` plus the call harness: it reads a Python literal list of arguments from stdin,
    calls `name(*args)` (or LeetCode's `Solution().name`) and prints the result's repr after CALL_MARK."""
    if not name.isidentifier():
        raise ValueError(f"fn_name {name!r} is not an identifier")
    return program + _CALL.format(name=name, mark=CALL_MARK)


def _installation() -> list[str]:
    """The directories the interpreter needs, outside /usr: its prefix (and a venv's), and the
    directory of the libpython it loaded, which its RUNPATH may place outside a moved prefix."""
    dirs = {sys.base_prefix, sys.prefix}
    with open("/proc/self/maps") as maps:
        dirs |= {os.path.dirname(line.split(None, 5)[5].strip()) for line in maps if "/libpython" in line}
    return sorted(d for d in dirs if not d.startswith("/usr/") and not any(d.startswith(o + "/") for o in dirs))


def _root_layout() -> list[tuple[str, ...]]:
    """What a sandbox's new root shows of the host, read-only: /usr, its merged-/usr links (or the
    real dirs of older systems), and the Python installation at its own paths under 0755 parents,
    so the program's uid can read it even where the host's parents are closed to it."""
    layout = [("bind", "/usr")]
    for top in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(top):
            layout.append(("symlink", top, os.readlink(top)))
        elif os.path.isdir(top):
            layout.append(("bind", top))
    for path in _installation():
        layout += [("dir", str(parent)) for parent in reversed(Path(path).parents[:-1])]
        layout.append(("bind", path))
    return layout


def _bwrap_prefix() -> list[str]:
    args = ["bwrap", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8", "--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--chdir", "/tmp",
            # The program's stdin/stdout/stderr files, apart so that a full /tmp cannot cut the output.
            "--perms", "0700", "--size", str(IO_TMPFS_BYTES), "--tmpfs", "/io", "--cap-drop", "ALL"]
    for cap in SERVER_CAPS:
        args += ["--cap-add", cap]
    for kind, path, *target in _root_layout():
        if kind == "bind":
            args += ["--ro-bind", path, path]
        elif kind == "symlink":
            args += ["--symlink", target[0], path]
        else:
            args += ["--perms", "0755", "--dir", path]
    return args


def _mountns_prefix(root: str) -> list[str]:
    """bwrap's layout built with util-linux as root: unshare's new pid, net, ipc, uts and mount
    namespaces; in them a tmpfs at `root` holding the read-only binds, its own /proc, the harmless
    devices, private /tmp and /io; then chroot, with the server's capabilities cut to SERVER_CAPS.
    `--kill-child` makes killing unshare kill the namespace's init, and so everything in it."""
    q = shlex.quote
    lines = ["set -e", "umask 022", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",  # chroot is in sbin
             f"mount -t tmpfs -o size=1m,mode=0755 cispo {q(root)}",
             f"mkdir {q(root)}/proc {q(root)}/dev {q(root)}/tmp {q(root)}/io",
             # /tmp before the binds: an installation under /tmp must stay visible above it.
             f"mount -t tmpfs -o size={TMPFS_BYTES},mode=1777 cispo {q(root)}/tmp",
             f"mount -t tmpfs -o size={IO_TMPFS_BYTES},mode=0700 cispo {q(root)}/io",
             f"mount -t proc proc {q(root)}/proc"]
    for dev in ("null", "zero", "full", "random", "urandom"):
        lines += [f"touch {q(root)}/dev/{dev}", f"mount --bind /dev/{dev} {q(root)}/dev/{dev}"]
    for kind, path, *target in _root_layout():
        at = q(root + path)
        if kind == "bind":
            lines += [f"mkdir -p {at}", f"mount --bind {q(path)} {at}", f"mount -o remount,bind,ro {at}"]
        elif kind == "symlink":
            lines.append(f"ln -s {q(target[0])} {at}")
        else:
            lines.append(f"mkdir -p -m 0755 {at}")
    caps = ",".join("+" + cap[4:].lower() for cap in SERVER_CAPS)
    lines.append(f'exec chroot {q(root)} setpriv --bounding-set -all,{caps} "$@"')
    return [shutil.which("unshare"), "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child", "--net",
            "--ipc", "--uts", "sh", "-c", "\n".join(lines), "cispo-sandbox"]


class _Server:
    """One fork-server process, its uid, and the framed pipe to it."""

    # No --die-with-parent or PDEATHSIG: those fire when the *thread* that started the server ends.
    # A server exits when its pipe closes, which happens when this process dies, however it dies.
    # (unshare's --kill-child is different: it ties the namespace's init to unshare's own process.)
    def __init__(self, level: str):
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        self.uid, self._uid_lock = _claim_uid()
        self.pid_owner = os.getpid()
        self._root = None if level in ("bwrap", "mountns") else tempfile.mkdtemp(prefix="cispo-sbx-")
        if level == "bwrap":
            prefix, work, io = _bwrap_prefix(), "/tmp/work", "/io"
        elif level == "mountns":  # each namespace mounts its own new root over STATE_DIR, unseen outside
            prefix, work, io = _mountns_prefix(str(STATE_DIR)), "/tmp/work", "/io"
        else:
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


_probed: tuple[str | None, dict[str, str]] | None = None  # (level in use, why each stronger one is not)
_idle: list[_Server] = []
_lock = threading.Lock()

# What real scoring runs, through the call harness: stdlib modules the fork-server did not preload
# (each read from the installation as the program's uid), then a read and a write outside the work dir.
_PROBE = """
import ast, copy, decimal, fractions, json, typing

def probe(secret, target):
    try:
        leaked = open(secret).read()
    except OSError:
        leaked = None
    try:
        open(target, "w").close()
        wrote = True
    except OSError:
        wrote = False
    return str(fractions.Fraction(decimal.Decimal("0.5")) + copy.copy(fractions.Fraction(1, 4))), leaked, wrote
"""


def _missing(level: str) -> str | None:
    """What this machine lacks for `level`, with how to get it; None when it can be probed."""
    root = os.geteuid() == 0
    if level == "rlimits":
        return "programs would run as root; as root they run as a uid of their own instead" if root else None
    if not root:
        return f"needs root, to run each program as an unprivileged uid of its own (running as uid {os.geteuid()})"
    if level == "bwrap" and not shutil.which("bwrap"):
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    tools = [t for t in MOUNTNS_TOOLS if not shutil.which(t)] if level == "mountns" else []
    return f"{', '.join(tools)} not found (apt-get install util-linux coreutils)" if tools else None


def _probe_level(level: str) -> tuple[_Server | None, str]:
    """A server at `level` that passed the probe, or (None, why it failed). The host file and dir
    the probe reaches for: at bwrap and mountns world-readable and world-writable ones, which the
    new root must hide; at uid root-only ones (the program must not be root); rlimits promises neither."""
    host = Path(tempfile.mkdtemp(prefix="cispo-probe-"))
    server = None
    try:
        hidden = level in ("bwrap", "mountns")
        host.chmod(0o1777 if hidden else 0o755)
        secret = host / "secret"
        secret.write_text("host")
        secret.chmod(0o644 if hidden else 0o600)
        server = _Server(level)
        reply = server.call(_request(call_program(_PROBE, "probe"), repr([str(secret), f"{host}/escaped"]), 5.0, 256),
                            deadline_s=30)
        got = ast.literal_eval(reply["stdout"].rpartition(CALL_MARK)[2]) if CALL_MARK in reply["stdout"] else None
        if reply["status"] != "ok" or not got:
            tail = (reply["stderr"].strip().splitlines() or [reply["detail"] or reply["status"]])[-1]
            why = f"a probe program failed: {tail}"
        elif got[0] != "3/4":
            why = f"a probe program computed {got[0]!r}, not '3/4'"
        elif level != "rlimits" and got[1] is not None:
            why = "a probe program read a host file it must not see"
        elif level != "rlimits" and (got[2] or (host / "escaped").exists()):
            why = "a probe program wrote outside its work dir"
        else:
            return server, ""
    except (_HarnessError, OSError) as exc:
        why = " ".join(f"could not start: {exc}".split())[:400]
    finally:
        shutil.rmtree(host, ignore_errors=True)
    if server:
        server.close()
    return None, why


def _probe() -> tuple[str | None, dict[str, str]]:
    """The strongest level whose probe passes here (only $CISPO_SANDBOX_LEVEL's when set), with why
    each level tried before it was refused. The passing server is kept for the first run."""
    forced = os.environ.get(FORCE_ENV)
    if forced and forced not in LEVELS:
        raise ValueError(f"{FORCE_ENV}={forced!r}: not a sandbox level; valid: {', '.join(LEVELS)}")
    why = {}
    for level in [forced] if forced else LEVELS:
        why[level] = _missing(level)
        if why[level] is None:
            server, why[level] = _probe_level(level)
            if server:
                _idle.append(server)
                del why[level]
                return level, why
    return None, why


def isolation(min_isolation: str = "mountns") -> str:
    """The isolation level programs run at here: 'bwrap', 'mountns', 'uid' or 'rlimits', the
    strongest whose probe passed (probed once per process, on first use; with $CISPO_SANDBOX_LEVEL
    set, only that level is probed). Raises SandboxUnavailable, one line naming what each stronger
    level lacks and how to install it, when the level is weaker than `min_isolation`."""
    global _probed
    if min_isolation not in LEVELS:
        raise ValueError(f"min_isolation {min_isolation!r}: valid: {', '.join(LEVELS)}")
    with _lock:
        if _probed is None:
            _probed = _probe()
    level, why = _probed
    floor = LEVELS.index(min_isolation)
    if level is not None and LEVELS.index(level) <= floor:
        return level
    reasons = [f"{lv}: {why[lv]}" for lv in LEVELS[:floor + 1] if lv in why] or \
              [f"{FORCE_ENV}={os.environ.get(FORCE_ENV)} forces a weaker level"]
    accept = f"; {level!r} works here: accept it with reward.min_isolation={level}" if level else ""
    raise SandboxUnavailable(f"no sandbox level at least as strong as {min_isolation!r} works here "
                             f"({'; '.join(reasons)}){accept}")


def _request(program: str, stdin: str, timeout_s: float, memory_mb: int) -> dict:
    return {"program": program, "stdin": stdin, "cpu_s": timeout_s, "wall_s": WALL_FACTOR * timeout_s + 2,
            "memory_mb": memory_mb}


def _run_once(req: dict, min_isolation: str) -> SandboxResult:
    level = isolation(min_isolation)
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


def run(program: str, stdin: str = "", *, timeout_s: float, memory_mb: int,
        min_isolation: str = "mountns") -> SandboxResult:
    """Run a Python program on `stdin` at the strongest isolation level this machine offers.

    `timeout_s` limits CPU time; a timeout is re-run once alone before it stands, so load cannot
    fail a program. A harness failure is retried once on a fresh server, then reported as
    `sandbox_error`, which the trainer should drop rather than score. Raises SandboxUnavailable
    when no level at least as strong as `min_isolation` works here (see `isolation`).
    """
    gate = getattr(_gates, "gate", None) or _Gate()
    _gates.gate = gate
    req = _request(program, stdin, timeout_s, memory_mb)
    result = None
    for alone in (False, True):
        gate.enter(alone)
        try:
            result = _run_once(req, min_isolation)
            if result.status == "sandbox_error":
                result = _run_once(req, min_isolation)
        finally:
            gate.leave()
        if result.status != "timeout":
            break
    return result


def close() -> None:
    """Stop every idle fork-server of this process (they also die with it) and forget the probed
    level: the next run probes again (after $CISPO_SANDBOX_LEVEL changed, say)."""
    global _probed
    with _lock:
        while _idle:
            _idle.pop().close()
        _probed = None
