"""Adversarial programs through CodeReward (``sdpo_ops/rewards/sandbox.py``, the confinement in ``sandbox_child.py``,
the test runner ``code_harness.py``): each is one clean failure with the right feedback, and the trainer's
process and machine are unharmed afterwards (the ``machine`` fixture checks: a canary file outside the sandbox
keeps its content, no process of the run is left, no sandbox directory or file is left in the temp directory,
its permissions are unchanged).

Limits are tight so that every bomb is cheap: 256 MiB of address space, 4 processes, 64 KiB of output.
"""

import os
import secrets
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest

from sdpo_ops.rewards import CodeReward, Sandbox, SandboxLimits

TESTS = ["assert add(1, 2) == 3"]
LIMITS = SandboxLimits(wall_seconds=10, cpu_seconds=5, memory_bytes=256 << 20, processes=4, output_bytes=64 << 10)


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(LIMITS, max_workers=2)


@pytest.fixture(scope="module")
def reward(sandbox):
    return CodeReward(sandbox=sandbox)


def _processes_of_runs(sandbox: Sandbox) -> list[str]:
    """Processes (zombies too) that belong to a sandbox run: working directory in a sandbox directory, or (root)
    one of the sandbox's uids."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            uid = entry.stat().st_uid
            cwd = os.readlink(os.path.join(entry.path, "cwd")) if uid in sandbox.uids or uid == os.getuid() else ""
        except OSError:
            continue
        if uid in sandbox.uids or "sdpo-sandbox-" in cwd:
            found.append(f"pid {entry.name} uid {uid} cwd {cwd}")
    return found


def _world_writable_files_of(sandbox: Sandbox) -> list[str]:
    leftovers = []
    for directory in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            leftovers += [e.path for e in os.scandir(directory) if e.stat(follow_symlinks=False).st_uid in sandbox.uids]
        except OSError:
            continue
    return leftovers


@pytest.fixture
def machine(tmp_path, sandbox):
    """A canary outside any sandbox; after the test, checks that the run left the machine as it found it."""
    canary = tmp_path / "canary.txt"
    canary.write_text("still here")
    temp = tempfile.gettempdir()
    temp_mode = os.stat(temp).st_mode
    sandboxes_before = {name for name in os.listdir(temp) if name.startswith("sdpo-sandbox-")}
    yield canary
    assert canary.read_text() == "still here"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["canary.txt"]
    assert _processes_of_runs(sandbox) == []
    assert stat.S_IMODE(os.stat(temp).st_mode) == stat.S_IMODE(temp_mode)
    assert {name for name in os.listdir(temp) if name.startswith("sdpo-sandbox-")} <= sandboxes_before
    assert _world_writable_files_of(sandbox) == []


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def run_one(reward, code: str, tests=TESTS) -> tuple[float, str]:
    result = reward([fenced(code)], tests=[tests])
    return result.scores[0], result.feedback[0]


def test_infinite_loop_times_out(machine, sandbox):
    impatient = CodeReward(sandbox=Sandbox(SandboxLimits(wall_seconds=1.0), max_workers=1, uid_base=61100))
    score, feedback = run_one(impatient, "def add(a, b):\n    while True:\n        pass")
    assert score == 0.0
    assert feedback == "Timed out after 1 s while running Test 1 of 1 (assert add(1, 2) == 3)."
    assert _processes_of_runs(impatient.sandbox) == []


def test_cpu_limit(machine):
    # The wall clock is generous: the CPU limit (SIGXCPU) ends it.
    cpu_bound = CodeReward(
        sandbox=Sandbox(SandboxLimits(wall_seconds=30, cpu_seconds=1), max_workers=1, uid_base=61100)
    )
    score, feedback = run_one(cpu_bound, "while True:\n    pass")
    assert score == 0.0
    assert feedback == "The program exceeded the CPU time limit."


def test_fork_bomb_is_stopped_by_the_process_limit(machine, reward, sandbox):
    score, feedback = run_one(reward, "import os\nwhile True:\n    os.fork()")
    assert score == 0.0
    assert feedback.startswith("The code failed before any test ran:")
    assert feedback.endswith("BlockingIOError: [Errno 11] Resource temporarily unavailable")


def test_children_left_behind_are_killed(machine, sandbox):
    """Background children, one in a session of its own (out of the process group), all die with the run."""
    if not sandbox.as_root:
        pytest.skip("without root a child that calls setsid() outlives the run (documented)")
    program = (
        "import os, sys, time\n"
        "for escape in (False, True):\n"
        "    if os.fork() == 0:\n"
        "        if escape:\n"
        "            os.setsid()\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print('parent done')\n"
    )
    result = sandbox.run({"p.py": program}, "p.py")
    assert result.returncode == 0 and result.stdout == "parent done\n"
    assert _processes_of_runs(sandbox) == []


@pytest.mark.parametrize(
    "code",
    ["x = bytearray(10 ** 10)", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))"],
    ids=["one-allocation", "growing"],
)
def test_memory_bomb(machine, reward, code):
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert feedback.startswith("Exceeded the memory limit (256 MiB) before any test ran:")
    assert feedback.endswith("MemoryError")


def test_huge_output(machine, reward):
    score, feedback = run_one(reward, "while True:\n    print('x' * 10000)")
    assert score == 0.0
    assert feedback == "Printed more than 0.0625 MiB of output."


def test_huge_output_in_an_io_test(machine, reward):
    score, feedback = run_one(reward, "while True:\n    print('x' * 10000)", tests=[{"input": "", "output": "1"}])
    assert score == 0.0
    assert feedback == "Test 1 of 1 (input '') printed more than the output limit:\nThe output exceeded the limit."


def test_writing_outside_its_directory(machine, reward, sandbox):
    if not sandbox.as_root:
        pytest.skip("without root the program has the user's permissions (documented): only HOME/TMPDIR move")
    intruder = Path(tempfile.gettempdir(), f"sdpo-intruder-{secrets.token_hex(4)}")
    code = (
        "import os\n"
        f"open({str(intruder)!r}, 'w').write('world-writable')\n"  # allowed, and removed after the run
        f"open({str(machine.parent / 'intruder.txt')!r}, 'w').write('x')\n"
    )
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert not intruder.exists()
    assert feedback.endswith(f"PermissionError: [Errno 13] Permission denied: '{machine.parent / 'intruder.txt'}'")


def test_deleting_files_it_does_not_own(machine, reward, sandbox):
    if not sandbox.as_root:
        pytest.skip("without root the program has the user's permissions (documented)")
    code = f"import os, shutil\nshutil.rmtree(os.path.expanduser('~'))\nos.remove({str(machine)!r})\n"
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert feedback.endswith(f"PermissionError: [Errno 13] Permission denied: '{machine}'")


def test_parent_environment_is_not_visible(machine, reward, sandbox, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("SDPO_TEST_SECRET", secret)
    code = (
        "import os\n"
        "found = [os.environ.get('SDPO_TEST_SECRET', 'absent'), sorted(os.environ)]\n"
        f"try:\n    found.append(open('/proc/{os.getpid()}/environ').read())\n"
        "except OSError as error:\n    found.append(type(error).__name__)\n"
        "raise RuntimeError(found)\n"
    )
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert secret not in feedback
    expected = ["absent", ["HOME", "LANG", "PATH", "TMPDIR"], "PermissionError"]
    if not sandbox.as_root:
        pytest.skip("without root /proc/<parent>/environ is readable (documented)")
    assert feedback.endswith(f"RuntimeError: {expected!r}")


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.setblocking(False)
    yield server
    server.close()


def _accepted_nothing(server: socket.socket) -> bool:
    time.sleep(0.05)  # a connection the run made would be queued by now
    try:
        server.accept()[0].close()
    except BlockingIOError:
        return True
    return False


def test_socket_to_localhost_is_refused(machine, reward, listener):
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'secret')\n"
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert feedback.endswith("PermissionError: network access is disabled in the sandbox")
    assert _accepted_nothing(listener)


def test_network_namespace_holds_without_the_audit_hook(machine, reward, sandbox, listener):
    """Another interpreter started by the program has no audit hook: the network namespace still stops it."""
    port = listener.getsockname()[1]
    connect = f"import socket; socket.create_connection(('127.0.0.1', {port}))"
    code = (
        "import subprocess, sys\n"
        f"completed = subprocess.run([sys.executable, '-c', {connect!r}], capture_output=True, text=True)\n"
        "raise RuntimeError(completed.stderr.strip().splitlines()[-1])\n"
    )
    if not sandbox.run({"p.py": "pass"}, "p.py").confinement["network_namespace"]:
        pytest.skip("this kernel refused a network namespace: only the audit hook guards (documented)")
    score, feedback = run_one(reward, code)
    assert score == 0.0
    assert feedback.endswith("RuntimeError: OSError: [Errno 101] Network is unreachable")
    assert _accepted_nothing(listener)


def test_sys_exit(machine, reward):
    assert run_one(reward, "import sys\nsys.exit(0)") == (
        0.0,
        "The code failed before any test ran:\nThe code called sys.exit(0).",
    )
    score, feedback = run_one(reward, "import sys\ndef add(a, b):\n    sys.exit(3)")
    assert (score, feedback) == (
        0.0,
        "Test 1 of 1 (assert add(1, 2) == 3) stopped the program:\nThe code called sys.exit(3).",
    )


def test_os_exit(machine, reward):
    score, feedback = run_one(reward, "import os\ndef add(a, b):\n    os._exit(0)")
    assert score == 0.0
    assert feedback == (
        "The program exited with status 0 before the tests finished while running Test 1 of 1 (assert add(1, 2) == 3)."
    )


def test_segfault(machine, reward):
    score, feedback = run_one(reward, "import ctypes\nctypes.string_at(0)")
    assert score == 0.0
    assert feedback == "The program crashed with a segmentation fault (SIGSEGV)."


def test_stdin_reads_end_at_once(machine, reward):
    score, feedback = run_one(reward, "import sys\ndata = sys.stdin.read()\nname = input()")
    assert score == 0.0
    assert feedback.endswith("EOFError: EOF when reading a line")


def test_recursion_overflow(machine, reward):
    score, feedback = run_one(reward, "def add(a, b):\n    return add(a, b)")
    assert score == 0.0
    assert feedback.startswith("Test 1 of 1 (assert add(1, 2) == 3) raised an exception:")
    assert "more times]" in feedback  # the repeated frames are folded
    assert feedback.endswith("RecursionError: maximum recursion depth exceeded")
    assert len(feedback) <= reward.max_feedback_chars


def test_completion_without_code_runs_nothing(machine, reward):
    result = reward(["I would use a loop.", ""], tests=[TESTS, TESTS])
    assert result.scores == [0.0, 0.0]
    assert result.feedback == ["No Python code found in the reply. Put the solution in a ```python code block."] * 2


def test_concurrency_is_bounded(machine, sandbox):
    """Six programs on two workers: each counts the sandboxed programs alive while it sleeps (children of a
    sandbox reaper); never more than two."""
    program = (
        "import os, time\n"
        "time.sleep(0.3)\n"
        "def sandboxed(pid):\n"
        "    try:\n"
        "        return b'PR_SET_CHILD_SUBREAPER' in open(f'/proc/{pid}/cmdline', 'rb').read()\n"
        "    except OSError:\n"
        "        return False\n"
        "def parent(pid):\n"
        "    try:\n"
        "        return int(open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "    except OSError:\n"
        "        return 1\n"
        "pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "print(sum(1 for pid in pids if sandboxed(pid) and sandboxed(parent(pid))))\n"
    )
    results = sandbox.run_many([({"p.py": program}, "p.py")] * 6)
    counts = [int(result.stdout) for result in results]
    assert all(1 <= count <= 2 for count in counts), counts
