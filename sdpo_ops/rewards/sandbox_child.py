"""The first code a sandboxed ``python -I`` process runs: it confines itself, then runs the program.

Run by :mod:`sdpo_ops.rewards.sandbox` as ``python -I -c <this file's source> <config json>``; the isolated
interpreter cannot import ``sdpo_ops``, so this file uses the standard library only. In order, before any
untrusted code exists in the process:

1. a network namespace of its own (``unshare(CLONE_NEWNET)``; without root, inside a new user namespace),
   where only a loopback interface exists and it is down, so no address, not even 127.0.0.1, is reachable;
2. resource limits, soft = hard (``RLIMIT_CORE`` 0, ``CPU``, ``AS``, ``FSIZE``, ``NOFILE``, ``NPROC``);
3. ``PR_SET_NO_NEW_PRIVS`` (no setuid binary can raise privileges again), ``PR_SET_PDEATHSIG`` = SIGKILL
   (it dies with its parent);
4. it becomes a child subreaper and forks: this process (root, if it was) waits, reaps every orphan of the
   run, and when the program ends (or on SIGTERM from the parent) kills what is left of the run and reaps
   it, so no zombie outlives the run (zombies count against ``RLIMIT_NPROC`` until someone reaps them);
5. the program's process, in a process group of its own, as root drops all privileges to the run's own
   unprivileged uid/gid (no supplementary groups), so ``RLIMIT_NPROC`` applies (the kernel exempts root),
   file permissions keep it out of others' files, and it cannot signal the reaper;
6. an audit hook refusing to create sockets, for the interpreter itself (a second line where 1. failed).

The program's process reports what was achieved as the first line on the report pipe, then executes the
program file.
"""

import contextlib
import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36


def _limit(kind: int, value: int) -> None:
    resource.setrlimit(kind, (value, value))


def _own_network_namespace(libc, as_root: bool) -> bool:
    """A fresh network namespace (as root directly, otherwise inside a fresh user namespace); False if refused."""
    if as_root:
        return libc.unshare(CLONE_NEWNET) == 0
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        return False
    # Map our own ids into the new user namespace: unmapped, we could not even create a file.
    with open("/proc/self/setgroups", "w") as handle:
        handle.write("deny")
    with open("/proc/self/uid_map", "w") as handle:
        handle.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as handle:
        handle.write(f"{gid} {gid} 1")
    return True


def _refuse_sockets(event: str, args) -> None:
    if event in ("socket.__new__", "socket.socketpair"):
        raise PermissionError("network access is disabled in the sandbox")


class _Stop(Exception):
    """Raised in the reaper by the parent's SIGTERM: the run is over (timed out or wrote too much)."""


def _raise_stop(signum, frame):
    raise _Stop


def _kill_run(program_pid: int, uid: int | None) -> None:
    """Kill the program's process group and, as root, every process of the run's uid (``kill(-1)`` as that uid:
    children that left the group too). The root reaper cannot be among them."""
    with contextlib.suppress(OSError):
        os.killpg(program_pid, signal.SIGKILL)
    if uid is None:
        return
    helper = os.fork()
    if helper == 0:
        try:
            os.setresuid(uid, uid, uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)


def _reap(program_pid: int, uid: int | None) -> int | None:
    """As the run's subreaper: wait for the program (orphans of the run are reparented here and reaped), then
    kill what is left of the run and reap it all. Returns the program's wait status (None if stopped first)."""
    status = None
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while status is None:
            pid, wait_status = os.waitpid(-1, 0)
            if pid == program_pid:
                status = wait_status
    except (_Stop, ChildProcessError):
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for _ in range(50):  # a fork racing the kill survives one round, not 50
        _kill_run(program_pid, uid)
        time.sleep(0.002)
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            break
    return status


def _exit_as(status: int | None) -> None:
    """End this process as the program ended: same exit code, or killed by the same signal."""
    if status is not None and os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
    os._exit(os.waitstatus_to_exitcode(status) if status is not None else 1)


def main() -> None:
    config = json.loads(sys.argv[1])
    report_fd = config["report_fd"]
    libc = ctypes.CDLL(None, use_errno=True)
    as_root = os.geteuid() == 0
    network_namespace = _own_network_namespace(libc, as_root)

    limits = config["limits"]
    _limit(resource.RLIMIT_CORE, 0)
    # SIGXCPU at the soft limit, SIGKILL one second later (in case SIGXCPU is caught).
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    _limit(resource.RLIMIT_AS, limits["memory_bytes"])
    _limit(resource.RLIMIT_FSIZE, limits["file_size_bytes"])
    _limit(resource.RLIMIT_NOFILE, limits["open_files"])
    _limit(resource.RLIMIT_NPROC, limits["processes"])
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != config["parent_pid"]:  # the parent died before PDEATHSIG was armed
        os._exit(1)
    uid = config["uid"] if as_root else None
    # This process stays as it is (root: the program cannot signal it) and reaps; the program runs in a child.
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    program_pid = os.fork()
    if program_pid:
        os.close(report_fd)
        _exit_as(_reap(program_pid, uid))

    os.setpgid(0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # setresuid cleared it; the reaper is the parent now
    os.umask(0o077)
    sys.addaudithook(_refuse_sockets)

    confinement = {"network_namespace": network_namespace, "uid": os.getuid(), "pid": os.getpid()}
    os.write(report_fd, (json.dumps({"event": "confined", **confinement}) + "\n").encode())
    program = config["program"]
    sys.argv = [program, str(report_fd)]
    with open(program, encoding="utf-8") as handle:
        source = handle.read()
    code = compile(source, program, "exec")
    del config, libc, handle
    exec(code, {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__})


main()
