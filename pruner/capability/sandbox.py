"""Running untrusted generated code: a separate Python process, a time limit, memory and process caps, no network.

The program runs with ``python -I`` in a fresh temporary directory under ``unshare --net`` when the
kernel allows it (a network namespace with no interfaces); otherwise a preamble replaces
:mod:`socket`'s constructors so any connection attempt raises. ``resource`` limits cap address
space, CPU seconds and written file size. Nothing here is a security boundary against a
determined attacker; it keeps a model's mistakes from touching the machine or the network.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PREAMBLE = """\
import socket as _s
def _no_network(*a, **k):
    raise OSError("network access is disabled in the sandbox")
_s.socket = _no_network
_s.create_connection = _no_network
_s.socketpair = _no_network
del _s, _no_network
"""


@dataclass
class RunResult:
    """Outcome of one sandboxed run: ``status`` is ``passed``, ``failed`` or ``timeout``."""

    status: str
    returncode: int | None
    stderr_tail: str
    isolation: str

    @property
    def passed(self) -> bool:
        """Whether the program exited with status 0 within the time limit."""
        return self.status == "passed"


@functools.lru_cache(maxsize=1)
def network_isolation() -> str:
    """``"unshare"`` if ``unshare --net`` works here, else ``"socket-guard"``."""
    tool = shutil.which("unshare")
    if tool is None:
        return "socket-guard"
    try:
        done = subprocess.run([tool, "--net", "--", sys.executable, "-c", "pass"], capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "socket-guard"
    return "unshare" if done.returncode == 0 else "socket-guard"


def _limits(memory_bytes: int, cpu_seconds: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 24, 1 << 24))
        os.setsid()

    return apply


def run_python(program: str, timeout: float = 10.0, memory_mb: int = 1024) -> RunResult:
    """Run ``program`` in a sandboxed Python process; passed = exit status 0 before ``timeout`` seconds."""
    isolation = network_isolation()
    with tempfile.TemporaryDirectory(prefix="persona-sandbox-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(_PREAMBLE + program)
        command = [sys.executable, "-I", path]
        if isolation == "unshare":
            command = [shutil.which("unshare"), "--net", "--"] + command
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        try:
            done = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                                  preexec_fn=_limits(memory_mb << 20, int(timeout) + 1))
        except subprocess.TimeoutExpired:
            return RunResult("timeout", None, "", isolation)
    status = "passed" if done.returncode == 0 else "failed"
    return RunResult(status, done.returncode, done.stderr.decode("utf-8", "replace")[-400:], isolation)
