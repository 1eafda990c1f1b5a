"""Run untrusted Python programs so that one cannot hang, starve or damage the machine running them (Linux).

No container runtime is assumed. Each program runs in a fresh ``python -I`` process (isolated mode: no
``PYTHON*`` variables, no user site, no script directory on ``sys.path``), in a temporary directory of its own
as working directory, with a clean environment (``PATH``, ``LANG``, and ``HOME``/``TMPDIR`` pointing into that
directory), stdin on ``/dev/null``, no inherited file descriptors but its report pipe, in a session and process
group of its own. Before any untrusted code runs, :mod:`sdpo_ops.rewards.sandbox_child` gives it a network
namespace, resource limits, and (as root) an unprivileged uid of its own. The parent enforces the wall-clock
limit and an output limit, and afterwards kills everything the program started.

What holds, and by which mechanism (measured on this project's 2-core Linux 6.18 VM, running as root):

- **Time**: wall clock (the parent kills the process group at ``wall_seconds``) and ``RLIMIT_CPU``.
- **Memory**: ``RLIMIT_AS`` per process (a 10 GB allocation is a ``MemoryError``, not an OOM kill).
- **Processes**: ``RLIMIT_NPROC``. The kernel counts it per *uid* and exempts root, so as root each concurrent
  run gets its own unprivileged uid (``uid_base + slot``): the limit then bounds exactly that run, and a fork
  bomb gets ``BlockingIOError``. Not as root, the limit is set to the user's current process count plus
  ``processes``: it bounds a fork bomb, but the count is shared with everything else the user runs.
- **No orphans**: the process group is killed when the program ends or times out; as root every process of the
  run's uid is then killed too (``kill(-1)`` from that uid), which catches children that left the group with
  ``setsid()``. Not as root, such a child survives the run (``PR_SET_PDEATHSIG`` only covers the first process).
- **Files**: ``RLIMIT_FSIZE`` bounds each file, ``RLIMIT_NOFILE`` open files. As root, the run's uid owns only
  its directory, so writing or deleting elsewhere fails on permissions, except in world-writable directories:
  what it leaves at the top of ``/tmp``, ``/var/tmp`` and ``/dev/shm`` is removed after the run. Not as root the
  program has the user's own permissions: ``HOME``/``TMPDIR`` pointing into its directory is the only guard.
- **Network**: a fresh network namespace (as root directly; otherwise through an unprivileged user namespace
  where the kernel allows it), whose only interface is a loopback that is down: nothing, not even 127.0.0.1,
  is reachable, from any process of the run. Where the namespace is refused, an audit hook in the interpreter
  (``sys.addaudithook``) refuses to create sockets: that covers Python's ``socket`` module only, not ``ctypes``
  calls into libc nor another program the code starts. :attr:`RunResult.confinement` says which held.
- **Secrets**: the environment is clean; as root, another uid cannot read ``/proc/<parent>/environ``.

What it does **not** protect against: reading any file the uid may read (world-readable files, the project's
source); CPU and memory contention within the limits (each of ``max_workers`` runs may use ``memory_bytes`` per
process and ``processes`` processes); disk filled with many files under ``file_size_bytes`` in its own directory
(removed after the run) or deep inside world-writable directories; kernel exploits, and anything else a
seccomp filter, a mount namespace or a container would stop. Not as root: everything the user may do, beyond
the limits above. A program can also forge what it reports on the report pipe (it runs in the same process as
the harness reporting on it): the sandbox protects the machine, not the reward from a program written to game it.

Throughput (``python -m bench.code_reward_throughput``, 2-core AMD EPYC VM at load average 6-7): 8-10 programs/s
with 2 workers; see the README's "Rewards from executed code" section.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

MIB = 1 << 20
_CHILD_SOURCE = (Path(__file__).with_name("sandbox_child.py")).read_text(encoding="utf-8")
# Directories any uid may write to; what a run leaves at their top level is removed after it (as root).
WORLD_WRITABLE_DIRECTORIES = ("/tmp", "/var/tmp", "/dev/shm")
# How long to keep reading a program's pipes once it has exited and its processes are killed.
_DRAIN_SECONDS = 0.5


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. ``processes`` counts the program itself; ``output_bytes`` is stdout + stderr together."""

    wall_seconds: float = 4.0
    cpu_seconds: int = 4
    memory_bytes: int = 512 * MIB
    file_size_bytes: int = 16 * MIB
    open_files: int = 64
    processes: int = 8
    output_bytes: int = 1 * MIB

    def __post_init__(self):
        if not (isinstance(self.wall_seconds, int | float) and self.wall_seconds > 0):
            raise ValueError(f"wall_seconds must be a number > 0, got {self.wall_seconds!r}")
        for name in ("cpu_seconds", "memory_bytes", "file_size_bytes", "open_files", "processes", "output_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.memory_bytes < 64 * MIB:
            raise ValueError(f"memory_bytes must be >= 64 MiB (the interpreter needs it), got {self.memory_bytes}")
        if self.open_files < 16:
            raise ValueError(f"open_files must be >= 16 (the interpreter needs some), got {self.open_files}")


@dataclass(frozen=True)
class RunResult:
    """How one program ended.

    ``returncode`` is the exit status, negative for a signal (``-11``: SIGSEGV), as ``subprocess`` reports it;
    it means nothing after ``timed_out`` or ``output_exceeded`` (the run was stopped). ``stdout`` and
    ``stderr`` keep at most ``output_bytes`` together. ``reports`` are the JSON lines the program wrote to its
    report pipe (file descriptor ``int(sys.argv[1])``), the first being ``confinement`` (what the sandbox
    achieved: ``network_namespace``, ``uid``, ``pid``).
    """

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    output_exceeded: bool
    reports: list[dict] = field(default_factory=list)
    confinement: dict = field(default_factory=dict)


class Sandbox:
    """Runs programs under :class:`SandboxLimits`, at most ``max_workers`` at a time (see the module docs).

    Args:
        limits: the per-run limits.
        max_workers: the most programs running at once, over :meth:`run` and :meth:`run_many` together.
        uid_base: as root, run ``slot`` (0 .. max_workers - 1) runs as uid and gid ``uid_base + slot``; these
            ids must belong to no user and no running process (checked here). Ignored when not root.
        python: the interpreter programs run with. Default: this one, or as root, if its standard library is not
            readable by other users (a pyenv under ``/root``), the first ``python3`` on ``/usr/local/bin:/usr/bin``
            whose library is. Programs need only the standard library.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        *,
        max_workers: int = 2,
        uid_base: int = 61000,
        python: str | None = None,
    ):
        self.limits = SandboxLimits() if limits is None else limits
        if not isinstance(self.limits, SandboxLimits):
            raise TypeError(f"limits must be a SandboxLimits, got {type(self.limits).__name__}")
        if not isinstance(max_workers, int) or isinstance(max_workers, bool) or not 1 <= max_workers <= 128:
            raise ValueError(f"max_workers must be an int in [1, 128], got {max_workers!r}")
        self.max_workers = max_workers
        self.as_root = os.geteuid() == 0
        self.python = _program_interpreter(python, self.as_root)
        self.uids = [uid_base + slot for slot in range(max_workers)] if self.as_root else []
        for uid in self.uids:
            _check_unused_uid(uid)
        self._slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(max_workers):
            self._slots.put(slot)

    def run(self, files: Mapping[str, str], program: str) -> RunResult:
        """Write ``files`` (name -> text) into a fresh directory and run ``program`` (one of them) there."""
        if program not in files:
            raise ValueError(f"program {program!r} is not one of the files {sorted(files)}")
        for name in files:
            if not name or os.sep in name or name.startswith("."):
                raise ValueError(f"file names must be plain names in the run's directory, got {name!r}")
        slot = self._slots.get()
        try:
            return self._run_in_slot(slot, files, program)
        finally:
            self._slots.put(slot)

    def run_many(self, jobs: Sequence[tuple[Mapping[str, str], str]]) -> list[RunResult]:
        """:meth:`run` for each ``(files, program)``, ``max_workers`` at a time; results in the jobs' order."""
        if len(jobs) <= 1:
            return [self.run(*job) for job in jobs]
        # Threads suffice: each only waits on its child process.
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(jobs))) as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    def _run_in_slot(self, slot: int, files: Mapping[str, str], program: str) -> RunResult:
        uid = self.uids[slot] if self.as_root else None
        directory = tempfile.mkdtemp(prefix="sdpo-sandbox-")
        try:
            for name, text in files.items():
                Path(directory, name).write_text(text, encoding="utf-8")
            if uid is not None:
                os.chown(directory, uid, uid)
            os.chmod(directory, 0o700)
            return self._execute(directory, program, uid)
        finally:
            if uid is not None:
                _kill_uid(uid)
            _remove_tree(directory)
            if uid is not None:
                _remove_owned_by(uid, WORLD_WRITABLE_DIRECTORIES)

    def _execute(self, directory: str, program: str, uid: int | None) -> RunResult:
        limits = self.limits
        report_read, report_write = os.pipe()
        processes = limits.processes if self.as_root else _user_process_count() + limits.processes
        config = {
            "report_fd": report_write,
            "parent_pid": os.getpid(),
            "uid": uid,
            "program": program,
            "limits": {**asdict(limits), "processes": processes},
        }
        environment = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": directory,
            "TMPDIR": directory,
        }
        try:
            process = subprocess.Popen(
                [self.python, "-I", "-c", _CHILD_SOURCE, json.dumps(config)],
                cwd=directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(report_write,),
                start_new_session=True,
            )
        finally:
            os.close(report_write)
        with process:
            return _supervise(process, report_read, limits, uid)


def _supervise(process: subprocess.Popen, report_read: int, limits: SandboxLimits, uid: int | None) -> RunResult:
    """Read the program's pipes until it exits, times out or writes too much; then kill all it started."""
    pidfd = os.pidfd_open(process.pid)
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray(), report_read: bytearray()}
    selector = selectors.DefaultSelector()
    for descriptor in buffers:
        selector.register(descriptor, selectors.EVENT_READ)
    selector.register(pidfd, selectors.EVENT_READ)
    deadline = time.monotonic() + limits.wall_seconds
    timed_out = output_exceeded = exited = False
    try:
        while not (exited or output_exceeded):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                if key.fd == pidfd:
                    exited = True
                else:
                    output_exceeded |= _read_into(selector, key.fd, buffers, report_read, limits.output_bytes)
        if not exited:
            exited = _stop_reaper(process.pid, pidfd)
        # Whatever the reaper could not stop (it was killed, or the program's group escaped it) dies now.
        if not exited:
            _kill_group(process.pid)
            _kill_group(_reports(buffers[report_read])[0].get("pid", 0) if buffers[report_read] else 0)
        if uid is not None:
            _kill_uid(uid)
        drain_deadline = time.monotonic() + _DRAIN_SECONDS
        selector.unregister(pidfd)
        while selector.get_map() and not output_exceeded:
            remaining = drain_deadline - time.monotonic()
            events = selector.select(remaining) if remaining > 0 else []
            if not events:
                break
            for key, _ in events:
                output_exceeded |= _read_into(selector, key.fd, buffers, report_read, limits.output_bytes)
        returncode = process.wait()
    finally:
        selector.close()
        os.close(pidfd)
        os.close(report_read)
    reports = _reports(buffers[report_read])
    confinement = reports.pop(0) if reports and reports[0].get("event") == "confined" else {}
    return RunResult(
        returncode=returncode,
        stdout=buffers[process.stdout.fileno()].decode("utf-8", errors="replace"),
        stderr=buffers[process.stderr.fileno()].decode("utf-8", errors="replace"),
        timed_out=timed_out,
        output_exceeded=output_exceeded,
        reports=reports,
        confinement=confinement,
    )


def _stop_reaper(pid: int, pidfd: int) -> bool:
    """SIGTERM to the run's reaper (it kills the run, reaps it and exits); True if it exited within a second."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    with selectors.DefaultSelector() as selector:
        selector.register(pidfd, selectors.EVENT_READ)
        return bool(selector.select(1.0))


def _reports(data: bytes) -> list[dict]:
    """The JSON objects among the lines of the report pipe (other lines are ignored)."""
    reports = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            reports.append(event)
    return reports


def _read_into(selector, descriptor: int, buffers: dict, report_read: int, output_bytes: int) -> bool:
    """Append what ``descriptor`` has to its buffer; True once stdout + stderr exceed ``output_bytes``."""
    data = os.read(descriptor, 1 << 16)
    if not data:
        selector.unregister(descriptor)
        return False
    buffers[descriptor] += data
    # The report pipe is bounded too: a program can write to it as much as to stdout.
    if descriptor == report_read:
        return len(buffers[descriptor]) > output_bytes
    return sum(len(buffer) for fd, buffer in buffers.items() if fd != report_read) > output_bytes


def _kill_group(pgid: int) -> None:
    if pgid <= 1:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int) -> None:
    """Kill every process of ``uid``: ``kill(-1, SIGKILL)`` from a shell running as that uid reaches them all."""
    for _ in range(10):
        if not _pids_of(uid):
            return
        subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[], check=False, env={})
        time.sleep(0.01)


def _pids_of(uid: int) -> list[int]:
    """Live (not zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if int(fields.get("Uid", "-1").split()[0]) == uid and not fields.get("State", "").startswith("Z"):
            pids.append(int(entry.name))
    return pids


def _user_process_count() -> int:
    """Threads of this process's real uid now: the base ``RLIMIT_NPROC`` counts from (it counts threads)."""
    uid, count = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(Path(entry.path, "task")))
            except OSError:
                continue
    return count


def _remove_owned_by(uid: int, directories: Sequence[str]) -> None:
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    _remove_tree(entry.path)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def _remove_tree(root: str) -> None:
    """``rmtree(root)``, making the run's directories writable where it left them read-only (not as root)."""

    def make_writable_and_retry(function, path, error_info) -> None:
        if isinstance(error_info[1], FileNotFoundError):  # the program removed it itself
            return
        with contextlib.suppress(OSError):
            if path != root:  # never touch what holds the tree (``/tmp``)
                os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
            function(path)

    shutil.rmtree(root, onerror=make_writable_and_retry)


def _program_interpreter(python: str | None, as_root: bool) -> str:
    """The interpreter to run programs with: one whose standard library the run's uid can read (as root)."""
    if python is not None or not as_root:
        return python or sys.executable
    candidates = [sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin")]
    for candidate in dict.fromkeys(filter(None, candidates)):
        query = "import sysconfig; print(sysconfig.get_paths()['stdlib'])"
        found = subprocess.run([candidate, "-I", "-c", query], capture_output=True, text=True, check=False)
        if found.returncode == 0 and _readable_by_others(Path(found.stdout.strip())):
            return candidate
    raise RuntimeError(
        "no Python whose standard library other users can read (the sandbox runs programs as an unprivileged "
        "uid): pass Sandbox(python=...)"
    )


def _readable_by_others(directory: Path) -> bool:
    """Whether a uid that owns nothing may list ``directory`` and reach it through every parent."""
    try:
        modes = [path.stat().st_mode for path in (directory, *directory.parents)]
    except OSError:
        return False
    return all(mode & stat.S_IXOTH for mode in modes) and bool(modes[0] & stat.S_IROTH)


def _check_unused_uid(uid: int) -> None:
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        user = None
    if user is not None:
        raise ValueError(f"uid_base: uid {uid} belongs to user {user.pw_name!r}; choose ids no one uses")
    if _pids_of(uid):
        raise ValueError(f"uid_base: uid {uid} has running processes; choose ids no one uses")
