"""What the side-by-side timing tools (packing_timing, overhead_timing, executor_timing) share: one whole process
run and timed, a failure said in one line, the min / median / max of a figure, and the provenance lines of a table."""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from typing import Any

from harness.errors import UserError
from harness.locations import REPO_ROOT


def run_whole(args: list[str], shown: str) -> float:
    """Run `python ARGS` from the repository root (its output dropped) and return its wall seconds; a failure is
    refused in one line: `shown` failed, and the process's last error line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise UserError(f"{shown} failed: {last}")
    return wall


def spread(values: list[float], digits: int = 1) -> str:
    return f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / {max(values):.{digits}f}"


def commit_and_versions(git: dict[str, Any] | None, versions: dict[str, str] | None) -> list[str]:
    git = git or {}
    return [f"- **Commit**: {git.get('commit') or 'unknown'}{' (with uncommitted changes)' if git.get('dirty') else ''}.",
            f"- **Versions**: {', '.join(f'{k} {v}' for k, v in (versions or {}).items())}."]
