"""The sandbox's fork-server: runs inside the isolation layers and executes one program per request.

Stdlib only and started as `python -c <this file's text>`, because inside bubblewrap (or the mountns
level's new root) the repository is not visible. Forking a warm interpreter per program costs about a millisecond where a fresh one
costs tens, which is what lets full isolation outrun a bare `subprocess.run` loop. The server holds
no test data: expected outputs stay with the caller, which compares them. It runs as root (at the bwrap
and mountns levels with only the capabilities listed in `rewards.sandbox`); each program runs as the
worker's unprivileged host uid, so it can signal neither the server nor anything outside.

Protocol on fds 0/1: 4-byte big-endian length, then JSON. Request: program, stdin, cpu_s, wall_s,
memory_mb. Reply: status, stdout, stderr, exit_code, cpu_s, detail.
"""
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import time
import traceback
import types

# Preloaded so that programs start fast. Any other import reads the installation as the program's
# uid, which is why `rewards.sandbox` probes each level with modules outside this list.
import bisect, collections, functools, heapq, itertools, math, random, re, string  # noqa: E401,F401

sys.set_int_max_str_digits(0)  # programs print and parse integers of any size, as contest judges allow

CFG = json.loads(sys.argv[1])
UID, WORK, IO = CFG["uid"], CFG["work"], CFG["io"]
OUT_CAP, ERR_CAP = CFG["out_cap"], CFG["err_cap"]
SWITCH_UID = os.geteuid() == 0  # without root the program keeps our uid: limits only, kill by session
LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 36, 38


def read_exact(n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def send(reply: dict) -> None:
    data = json.dumps(reply).encode()
    os.write(1, struct.pack(">I", len(data)) + data)


def leftover_processes(session: int) -> list[int]:
    """Live processes of the worker's uid or, without a uid of its own (not root), of the program's
    session. Reads /proc/*/status: a non-dumpable process shows its /proc directory as root's."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            mine = int(fields["Uid"].split()[0]) == UID if SWITCH_UID else os.getsid(int(name)) == session
        except OSError:
            continue
        if mine and not fields["State"].strip().startswith("Z"):
            pids.append(int(name))
    return pids


def reap() -> None:
    # As a child subreaper the server inherits orphans (daemons) and must collect their zombies.
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def group_cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and of the children they reaped: a fork bomb's CPU is the sum."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def signal_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_leftovers(session: int = -1) -> bool:
    """SIGKILL every process of the worker's uid until none is left; RLIMIT_NPROC bounds the regrowth."""
    for _ in range(200):
        reap()
        pids = leftover_processes(session)
        if not pids:
            reap()  # zombies count against RLIMIT_NPROC until collected
            return True
        signal_all(pids)
        time.sleep(0.002)
        reap()
    return False


def child(req: dict, work: str, io_dir: str, ready_w: int) -> None:
    """Set up the limits, drop to the worker uid, tell the server, run the program. Never returns."""
    try:
        os.setsid()
        # The scoring process blocks SIGINT and SIGTERM (rewards.pool); the program gets a judge's plain mask.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for fd, name, flags in ((0, "in", os.O_RDONLY), (1, "out", os.O_WRONLY), (2, "err", os.O_WRONLY)):
            os.dup2(os.open(f"{io_dir}/{name}", flags), fd)
        os.dup2(ready_w, 3)
        os.closerange(4, 1 << 16)  # the control pipe and everything else the server holds
        os.chdir(work)
        cpu = max(1, int(-(-req["cpu_s"] // 1)))  # RLIMIT_CPU counts whole seconds
        mem = req["memory_mb"] << 20
        for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                                (resource.RLIMIT_FSIZE, OUT_CAP, OUT_CAP), (resource.RLIMIT_NOFILE, 64, 64),
                                (resource.RLIMIT_NPROC, CFG["nproc"], CFG["nproc"]), (resource.RLIMIT_CORE, 0, 0)):
            resource.setrlimit(res, (soft, hard))
        if SWITCH_UID:
            os.setgroups([])
            os.setgid(UID)
            os.setuid(UID)  # from root to non-root: the kernel clears every capability
        if LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(NO_NEW_PRIVS)")
        os.umask(0o077)
        os.write(3, b"1")  # setup done: a failure before this line is the harness's, not the program's
        os.close(3)
    except BaseException:
        os._exit(1)
    sys.stdin, sys.stdout = open(0, closefd=False), open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    sys.argv = ["main.py"]
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    code = 0
    try:
        exec(compile(req["program"], "main.py", "exec"), main.__dict__)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)  # without this frame
        code = 1
    try:
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        code = code or 1
    os._exit(code & 0xFF)


def clear_scratch() -> None:
    """Remove what earlier programs left in and beside their work dir. At bwrap and mountns that dir is
    the private /tmp, which lives as long as the server: a file left there would reach the next
    program, and a /tmp filled to its cap would fail every later program that writes a file. Only
    entries of the program's uid go; the Python installation may be bound under /tmp, read-only."""
    for entry in os.scandir(os.path.dirname(WORK)):
        if entry.stat(follow_symlinks=False).st_uid != UID:
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            os.unlink(entry.path)


def run(req: dict) -> dict:
    work, io_dir = WORK, IO
    clear_scratch()
    os.makedirs(io_dir, 0o700, exist_ok=True)
    os.mkdir(work, 0o700)
    if SWITCH_UID:
        os.chown(work, UID, UID)
    with open(f"{io_dir}/in", "w") as f:
        f.write(req["stdin"])
    for name in ("out", "err"):
        os.close(os.open(f"{io_dir}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    ready_r, ready_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        child(req, work, io_dir, ready_w)
    os.close(ready_w)
    pidfd = os.pidfd_open(pid)
    timed_out = False
    # RLIMIT_CPU holds each process; every 0.1 s also add up the CPU of all of them (a fork bomb),
    # and the wall limit catches programs that sleep.
    while not select.select([pidfd], [], [], 0.1)[0]:
        if time.monotonic() - start > req["wall_s"] or group_cpu(leftover_processes(pid)) > req["cpu_s"]:
            timed_out = True
            signal_all(leftover_processes(pid))  # no reaping here: wait4 below must find the child
            break
    _, status, usage = os.wait4(pid, 0)
    os.close(pidfd)
    wall = time.monotonic() - start
    set_up = os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    cleaned = kill_leftovers(session=pid)
    with open(f"{io_dir}/out", "rb") as f:
        out = f.read(OUT_CAP + 1)
    with open(f"{io_dir}/err", "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - ERR_CAP))
        err = f.read()
    cpu = usage.ru_utime + usage.ru_stime
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
    exit_code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -sig
    if not set_up:
        verdict, detail = "sandbox_error", "the sandbox could not set up the program's limits"
    elif not cleaned:
        verdict, detail = "sandbox_error", "processes of the worker uid survived SIGKILL"
    elif timed_out or sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= req["cpu_s"]):
        verdict, detail = "timeout", f"cpu {cpu:.2f}s, wall {wall:.2f}s"
    elif sig == signal.SIGXFSZ or len(out) > OUT_CAP:
        verdict, detail = "error", f"output over {OUT_CAP} bytes"
    else:
        verdict, detail = ("ok" if exit_code == 0 else "error"), ""
    return {"status": verdict, "stdout": out[:OUT_CAP].decode(errors="replace"),
            "stderr": err.decode(errors="replace"), "exit_code": exit_code, "cpu_s": cpu, "detail": detail}


def serve() -> None:
    LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if SWITCH_UID:
        kill_leftovers()  # a crashed predecessor with this uid may have left processes behind
    send({"ready": True})
    while True:
        try:
            (n,) = struct.unpack(">I", read_exact(4))
            req = json.loads(read_exact(n))
        except EOFError:
            return
        try:
            send(run(req))
        except Exception as exc:  # our own fault: say so, and keep serving
            send({"status": "sandbox_error", "stdout": "", "stderr": "", "exit_code": None, "cpu_s": 0.0,
                  "detail": f"{type(exc).__name__}: {exc}"})


serve()
