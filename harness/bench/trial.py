"""One trial: `python recipes/<name>.py ...` in its own process, supervised from outside.

Its own process means its peak memory is its own and a crash, out-of-memory or hang ends only that
trial. The trial is killed at its wall-clock limit, asked to stop like Ctrl-C when the sweep is
stopped (it then records itself as interrupted), and dies with whatever started it, even a
SIGKILLed sweep or Ray worker (the kernel's parent-death signal). Its console output goes to
<trial>/trial.log. `classify` turns what happened into the trial's status.

`python -m harness.bench.trial SPEC` runs one trial from a JSON spec and prints its outcome as JSON:
it is how a Ray worker runs a trial (harness.bench.ray_executor), exactly as a local sweep does.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from harness.errors import EXIT_INTERRUPTED, EXIT_OOM

# Light imports only: a Ray worker starts this module for every trial (harness.run.config would pull in
# transformers, seconds of start-up per trial).
from harness.locations import REPO_ROOT

STATUS_OK = "ok"
STOP_GRACE_S = 30  # how long a trial asked to stop may take to record itself as interrupted

# The trial's process arms the kernel's parent-death signal itself, then becomes the recipe (exec keeps
# the pid and the signal). Done there rather than in a preexec_fn, which is unsafe while other threads
# run (the sweep's --parallel workers): a fork can copy a lock another thread holds.
DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    # The sweep asks a trial to stop with SIGINT: it must hear it even where it was started with SIGINT
    # blocked (a Ray worker's mask) or ignored (a shell without job control), both of which exec keeps.
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])\n"
    "signal.signal(signal.SIGINT, signal.SIG_DFL)\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL\n"
    "    if os.getppid() != int(sys.argv[1]): os._exit(137)  # the parent died before the line above\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
)


def die_with_parent(python_args: list[str]) -> list[str]:
    """`python PYTHON_ARGS...`, started so that it is SIGKILLed when the thread that started it goes away."""
    return [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *python_args]


class _OutputPump(threading.Thread):
    """Copies the trial's console output to trial.log and (unless quiet) to this terminal."""

    def __init__(self, stream, log_path: Path, echo: bool):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.echo = stream, log_path, echo

    def run(self) -> None:
        with open(self.log_path, "ab") as log:
            while chunk := self.stream.read1(65536):
                log.write(chunk)
                log.flush()
                if self.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _wait(pid: int, deadline: float | None, stop: threading.Event | None = None):
    """(status, rusage) once the child exits, or None at the deadline or when `stop` is set."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if stop is not None and stop.is_set():
            return None
        time.sleep(0.1)


def _stop(pid: int, grace_s: float, kill: threading.Event | None = None):
    """Ask the trial to stop like Ctrl-C would (it then records itself as interrupted), kill it if it
    does not within grace_s (or at once when `kill` is set: a second Ctrl-C), and reap it."""
    try:
        os.kill(pid, signal.SIGINT)
        reaped = _wait(pid, time.monotonic() + grace_s, kill)
    except KeyboardInterrupt:  # a second Ctrl-C in this (main) thread: no more waiting
        reaped = None
    if reaped is None:
        _kill_tree(pid)
        _, status, usage = os.wait4(pid, 0)
        return status, usage
    return reaped


def run_trial(script: Path, argv: list[str], trial_dir: Path, timeout_s: float, echo: bool,
              cpu_threads: int | None = None, env: dict[str, str] | None = None,
              stop: threading.Event | None = None, kill: threading.Event | None = None) -> dict[str, Any]:
    """Run one trial in its own process; what happened, measured from outside the trial.

    env: variables set for this trial only (CUDA_VISIBLE_DEVICES of its GPU). stop: when set (the sweep
    was stopped from another thread), the trial is asked to stop as Ctrl-C would; kill: stop waiting."""
    # A leftover checkpoint from an earlier attempt would make the recipe resume and time only part of it.
    shutil.rmtree(trial_dir, ignore_errors=True)
    run_dir = trial_dir / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    python_args = [str(script), *argv, "--output_dir", str(run_dir)]
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if cpu_threads is not None:
        child_env.update(OMP_NUM_THREADS=str(cpu_threads), MKL_NUM_THREADS=str(cpu_threads))
    started = time.monotonic()
    started_at = _now()
    proc = subprocess.Popen(
        die_with_parent(python_args), cwd=REPO_ROOT, env=child_env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    pump = _OutputPump(proc.stdout, trial_dir / "trial.log", echo)
    pump.start()
    timed_out = interrupted = False
    try:
        reaped = _wait(proc.pid, started + timeout_s, stop)
        if reaped is None and stop is not None and stop.is_set():
            interrupted = True
            status, usage = _stop(proc.pid, STOP_GRACE_S, kill)
        elif reaped is None:
            timed_out = True
            _kill_tree(proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            status, usage = reaped
    except KeyboardInterrupt:
        interrupted = True
        status, usage = _stop(proc.pid, STOP_GRACE_S, kill)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 here, not by Popen
    pump.join(timeout=10)
    proc.stdout.close()
    return {
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "interrupted": interrupted,
        "wall_seconds": round(time.monotonic() - started, 3),
        # ru_maxrss of this child alone (KiB on Linux): its whole life, model load and evaluation included
        "process_peak_rss_mb": round(usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1),
        "started_at": started_at,
        "finished_at": _now(),
        "result": _read_result(run_dir / "result.json"),
        "log_tail": _tail(trial_dir / "trial.log"),
    }


def not_run(failure: str | None = None, interrupted: bool = False, trial_dir: Path | None = None) -> dict[str, Any]:
    """The outcome of a trial whose process could not be supervised to the end (a Ray worker that
    died, a task cancelled): nothing measured, so nothing is made up."""
    return {
        "exit_code": None, "timed_out": False, "interrupted": interrupted, "failure": failure,
        "wall_seconds": None, "process_peak_rss_mb": None, "started_at": None, "finished_at": _now(),
        "result": None, "log_tail": _tail(trial_dir / "trial.log") if trial_dir else "",
    }


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tail(path: Path, max_chars: int = 2000) -> str:
    try:
        text = path.read_bytes()[-8 * max_chars:].decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]  # keep a progress bar's last state
    return "\n".join(line for line in lines if line.strip())[-max_chars:]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def classify(outcome: dict[str, Any], memory_budget_gb: float | None, timeout_s: float) -> tuple[str, str | None]:
    """The trial's status and, unless ok, the reason in one line."""
    result = outcome["result"] or {}
    code = outcome["exit_code"]
    last_line = outcome["log_tail"].splitlines()[-1] if outcome["log_tail"] else ""
    if outcome["timed_out"]:
        return "timeout", f"killed after the {timeout_s:g} s wall-clock limit (--trial-timeout)"
    # A trial that saw the Ctrl-C itself (the terminal sends it to the whole process group) may have
    # exited before the sweep asked it to stop: its exit code says so all the same.
    if outcome["interrupted"] or code == EXIT_INTERRUPTED:
        return "interrupted", "the sweep was stopped (Ctrl-C / SIGTERM) during this trial"
    if outcome.get("failure"):
        return "failed", outcome["failure"]
    budget_mb = memory_budget_gb * 1024 if memory_budget_gb else None
    if code == 0 and result.get("status") == STATUS_OK:
        if budget_mb is not None and result.get("peak_memory_kind") == "cpu_rss":
            peak = max(outcome["process_peak_rss_mb"], result.get("peak_memory_mb") or 0)
            if peak > budget_mb:
                return "over-budget", (
                    f"peak RSS {peak:.0f} MiB > the {memory_budget_gb:g} GiB memory budget "
                    "(CPU: checked after the run, not enforced)"
                )
        return STATUS_OK, None
    if code == EXIT_OOM or result.get("status") == "oom":
        if budget_mb is not None and result.get("memory_budget_enforced") == "cuda_allocator":
            return "over-budget", f"out of memory at the {memory_budget_gb:g} GiB cap: the trial needs more"
        return "oom", (result.get("error") or last_line or "out of memory")[:300]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return "failed", f"killed by {name}{hint}"
    # A recipe's own UserError is one line on stderr: the most useful reason there is.
    reason = last_line if code == 2 else (result.get("error") or last_line or f"exit code {code}")
    return "failed", reason.strip()[:300]


def _run_spec(spec_json: str) -> int:
    """Entry of `python -m harness.bench.trial SPEC`: run the trial the spec describes, print its outcome
    as one JSON line on stdout (the trial's own output goes to its trial.log only)."""
    spec = json.loads(spec_json)
    outcome = run_trial(Path(spec["script"]), spec["argv"], Path(spec["trial_dir"]), spec["timeout_s"], echo=False,
                        cpu_threads=spec.get("cpu_threads"), env=spec.get("env"))
    print(json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_run_spec(sys.argv[1]))
