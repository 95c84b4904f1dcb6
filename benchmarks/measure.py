"""Run a command as a child process and measure its wall time and peak RSS (whole process)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time


def measure(cmd: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[float, float, int]:
    """Run ``cmd``; return (wall seconds, peak RSS in MB, exit status). -1 status on timeout.

    ``os.wait4`` gives the rusage of exactly this child, so runs do not contaminate each other.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = None if timeout is None else start + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return time.perf_counter() - start, usage.ru_maxrss / 1024, -1
        time.sleep(0.02)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        print(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err}", file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def machine() -> str:
    """One line naming the machine the figures come from."""
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GB RAM, torch {torch.__version__}"
