"""Run a command as a child process and measure its wall time and peak RSS (whole process)."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import time

LAST_STDERR = ""  # stderr of the last measured command (children may print extra timings there)
LAST_CPU = float("nan")  # CPU seconds (user + system) of the last measured command, from GNU time


def measure(
    cmd: list[str], timeout: float | None = None, env: dict | None = None, cwd: str | os.PathLike | None = None
) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB, exit status). -1 status on timeout.

    The command runs under GNU ``time -f %M``: Linux keeps a process's peak-RSS mark across
    fork + exec, so measuring a direct child of this (large) Python process would report at least
    this process's own RSS. ``time`` is a small process, and it reports its child's peak.
    """
    global LAST_STDERR, LAST_CPU
    start = time.perf_counter()
    if os.path.exists("/usr/bin/time"):  # absent on some machines: then RSS is os.wait4's (see above)
        cmd = ["/usr/bin/time", "-f", "peak-rss-kb %M\ncpu-s %U %S", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # `time` and the command under it
            _, status, usage = os.wait4(proc.pid, 0)
            return time.perf_counter() - start, usage.ru_maxrss / 1024, -1
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    LAST_STDERR = err
    if proc.returncode != 0:
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}", file=sys.stderr)
    peaks = [line.split()[1] for line in err.splitlines() if line.startswith("peak-rss-kb ")]
    cpu = [line.split()[1:] for line in err.splitlines() if line.startswith("cpu-s ")]
    LAST_CPU = float(cpu[-1][0]) + float(cpu[-1][1]) if cpu else float("nan")
    return wall, (int(peaks[-1]) / 1024 if peaks else usage.ru_maxrss / 1024), proc.returncode


def machine() -> str:
    """One line naming the machine the figures come from."""
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GB RAM, torch {torch.__version__}"
