"""The sweep: plan the trials, skip those already recorded ok, hand the rest to an executor, append
one record per finished trial to runs.jsonl (from this main thread only, whichever executor ran it),
and rebuild the tables. Ctrl-C / SIGTERM stops the running trials, which are recorded as interrupted;
rerunning the command resumes."""
from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness.bench.executors import (
    Finished,
    Job,
    LocalExecutor,
    check_executor_options,
    cores_note,
    echo_note,
    local_slots,
    parse_gpus,
)
from harness.bench.grid import OFFLINE_BUDGET_STEPS, OFFLINE_CPU_THREADS, OFFLINE_SETTINGS, Trial, plan_trials
from harness.bench.ray_executor import RayExecutor
from harness.bench.trial import STATUS_OK, classify
from harness.errors import EXIT_INTERRUPTED, UserError
from harness.locations import REPO_ROOT
from harness.models.offline import OFFLINE_MODELS
from harness.reporting.flops import mfu_percent
from harness.reporting.page import write_report
from harness.reporting.runs import RUNS_FILE, append_record, read_records, trial_record_problem


def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    name = args.name or _slug(args.model or "default-models")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise UserError(f"--name {name!r}: use letters, digits and . _ + - only (it becomes a file name)")
    check_executor_options(args)
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    offline = args.model in OFFLINE_MODELS
    no_budget = all(getattr(args, b) is None for b in ("budget_steps", "budget_seconds", "budget_tokens"))
    if offline and no_budget:
        args.budget_steps = OFFLINE_BUDGET_STEPS
        given = {item.partition("=")[0].strip().lstrip("-") for item in args.sets}
        extra = [f"{k}={v}" for k, v in OFFLINE_SETTINGS.items() if k not in given]
        args.sets = [*args.sets, *extra]
        print(f"Offline model without a budget: --budget-steps {OFFLINE_BUDGET_STEPS}"
              f"{''.join(f', --set {e}' for e in extra)} for every trial.", flush=True)
    if offline and args.cpu_threads is None:
        args.cpu_threads = OFFLINE_CPU_THREADS
    if (args.executor == "ray" or args.parallel) and args.cpu_threads is None:
        args.cpu_threads = 1  # trials at once: one thread each, so they do not fight over the cores
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UserError(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    if args.trial_timeout is not None and not args.trial_timeout > 0:  # 0 used to mean "the default"
        raise UserError(f"--trial-timeout must be a positive number of seconds, got {args.trial_timeout}")
    timeout_s = args.trial_timeout or (600.0 if offline else 21600.0)

    results_dir = Path(args.results_dir).expanduser().resolve()
    sweep_dir = Path(args.output_root).expanduser().resolve() / name
    check_writable(results_dir, "--results-dir", create=not args.dry_run)  # a dry run writes nothing
    if args.dry_run:
        trials = plan_trials(args)
        for i, t in enumerate(trials, 1):
            print(f"[{i}/{len(trials)}] {t.trial_id}: {_command(t, sweep_dir)}")
        return 0
    check_writable(sweep_dir, "--output-root")
    # Held until this process ends (by any means): a second sweep of the same trials is refused
    # before it plans anything, instead of starting trials this one is running.
    with sweep_lock(sweep_dir, name):
        return _run_sweep(args, argv, name, results_dir, sweep_dir, gpus, timeout_s)


def _run_sweep(args: argparse.Namespace, argv: list[str], name: str, results_dir: Path, sweep_dir: Path,
               gpus: list[str] | None, timeout_s: float) -> int:
    runs_file = results_dir / RUNS_FILE
    records = read_records(runs_file, check=trial_record_problem)  # warns about (and skips) a damaged line
    trials = plan_trials(args)
    done = {r.get("trial_hash") for r in records if r.get("sweep") == name and r.get("status") == STATUS_OK}
    bench_command = shlex.join(["python", "-m", "harness.bench", *argv])
    jobs = []
    for i, trial in enumerate(trials, 1):
        if trial.config_hash in done and not args.force:
            print(f"[{i}/{len(trials)}] {trial.trial_id}: already recorded ok, skipped (--force reruns it)", flush=True)
        else:
            jobs.append(Job(i, trial, sweep_dir / trial.trial_id))

    progress = _Progress(len(trials), len(jobs))
    executor = _executor(args, gpus, timeout_s, progress.announce)
    progress.slots = executor.capacity
    print(f"Sweep {name}: {len(trials)} trials, {executor.describe()}; records -> {_show(runs_file)}; "
          f"trial folders -> {_show(sweep_dir)}", flush=True)
    for note in (echo_note(executor.capacity, args.quiet),
                 cores_note(executor.capacity, args.cpu_threads) if args.executor == "local" and not gpus else None):
        if note:
            print(note, flush=True)

    def record(finished: Finished) -> None:
        status, reason = classify(finished.outcome, args.memory_budget_gb, timeout_s)
        entry = _record(name, finished, status, reason, args, timeout_s, bench_command, sweep_dir)
        append_record(runs_file, entry)
        progress.finished(finished, entry)

    try:
        try:
            executor.start(jobs)
            while (finished := executor.next_finished()) is not None:
                record(finished)
        except KeyboardInterrupt:
            print("bench: stopping the running trial(s); Ctrl-C again kills them", file=sys.stderr, flush=True)
            for finished in executor.stop():
                record(finished)
            print(f"bench: interrupted; the {progress.count} trial(s) finished so far are recorded in "
                  f"{_show(runs_file)}; rerun the same command to resume", file=sys.stderr, flush=True)
            _write_tables(results_dir, name)
            return EXIT_INTERRUPTED
    finally:
        executor.close()
    _write_tables(results_dir, name)
    if progress.not_ok:
        print(f"{progress.not_ok} of {progress.count} trial(s) run did not finish ok; the reasons are in the table",
              flush=True)
    return 1 if progress.not_ok else 0


def _executor(args: argparse.Namespace, gpus: list[str] | None, timeout_s: float, announce):
    if args.executor == "ray":
        return RayExecutor(args.ray_address, args.ray_resources, args.parallel, timeout_s, args.cpu_threads, announce,
                           connect_timeout_s=args.ray_connect_timeout)
    return LocalExecutor(local_slots(args.parallel, gpus), timeout_s, args.cpu_threads, echo=not args.quiet,
                         announce=announce)


def _record(name: str, finished: Finished, status: str, reason: str | None, args: argparse.Namespace,
            timeout_s: float, bench_command: str, sweep_dir: Path) -> dict[str, Any]:

    trial, outcome = finished.job.trial, finished.outcome
    result = outcome.get("result")
    return {
        "schema": 1,
        "sweep": name,
        "trial_id": trial.trial_id,
        "trial_hash": trial.config_hash,
        "status": status,
        "reason": reason,
        "recipe": trial.recipe,
        "method": trial.method,
        "model": trial.model,
        "rank": trial.rank,
        "rank_setting": trial.rank_setting,
        "seed": trial.seed,
        "axes": trial.axes,
        "scored_on": trial.scored_on,
        "budgets": {
            "steps": args.budget_steps, "seconds": args.budget_seconds, "tokens": args.budget_tokens,
            "memory_gb": args.memory_budget_gb, "trial_timeout_s": timeout_s,
        },
        "cpu_threads": args.cpu_threads,
        "ran_on": finished.ran_on,
        **{k: outcome.get(k) for k in ("exit_code", "wall_seconds", "process_peak_rss_mb", "started_at", "finished_at")},
        "error_tail": outcome.get("log_tail") if status != STATUS_OK else None,
        "mfu_percent": mfu_percent(result) if result else None,
        "bench_command": bench_command,
        "trial_command": _command(trial, sweep_dir),
        "trial_dir": _show(sweep_dir / trial.trial_id),
        "result": result,
    }


class _Progress:
    """The console lines: a trial starting, a trial finished (with an ETA from those finished so far)."""

    def __init__(self, total: int, to_run: int):
        self.total, self.to_run, self.slots = total, to_run, 1
        self.durations: list[float] = []
        self.count = self.not_ok = 0

    def announce(self, job: Job, where: str) -> None:  # called from worker threads: one print, one line
        trial = job.trial
        eta = _eta(self.durations, self.to_run - self.count, self.slots)
        print(f"{self._head(job)}: {trial.recipe} ({trial.method}{_rank_text(trial)}, seed {trial.seed}"
              f"{''.join(f', {k}={v}' for k, v in trial.axes.items())}){f' on {where}' if where else ''}{eta}",
              flush=True)

    def finished(self, finished: Finished, record: dict[str, Any]) -> None:
        self.count += 1
        self.not_ok += record["status"] != STATUS_OK
        wall = finished.outcome.get("wall_seconds")
        if wall is not None:
            self.durations.append(wall)
        took = f" in {wall:.1f} s" if wall is not None else ""
        print(f"{self._head(finished.job)}: {record['status']}{took}{_summary(record)}", flush=True)

    def _head(self, job: Job) -> str:
        return f"[{job.number}/{self.total}] {job.trial.trial_id}"


SWEEP_LOCK = ".sweep.lock"  # in the sweep's trial folder, <output-root>/<name>/


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, name: str):
    """An exclusive flock on <output-root>/<name>/.sweep.lock for the sweep's whole life. The kernel
    releases it when the process ends, however it ends (kill -9 included), so it never goes stale;
    the file itself stays, holding the pid of the sweep that last held it (for the refusal's line)."""
    path = sweep_dir / SWEEP_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"--output-root: cannot create {path} ({exc.strerror}); "
                        "pass a folder you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            by = f" (process {holder})" if holder.isdigit() else ""
            raise UserError(f"sweep {name} is already running{by} with its trials in {_show(sweep_dir)}; wait for it "
                            "to finish (rerunning then resumes it), or give this sweep another --name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def check_writable(folder: Path, option: str, create: bool = True) -> None:
    """Refuse a folder this process cannot write into. Without create, a folder not there yet is judged by the
    nearest folder above it that is (writing a file there and removing it), and nothing is left behind."""
    probe = folder
    if not create:
        for _ in range(len(folder.parts)):  # bounded: one step up per part of the path
            if probe.exists():
                break
            probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = f"{folder}: {probe}" if probe != folder else str(folder)
        raise UserError(f"{option} {where} is a file, not a folder; pass a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".bench-write-check-"):  # os.access says yes to root
            pass
    except OSError as exc:
        raise UserError(f"{option} {folder} is not writable ({exc.strerror}); pass a folder you can write to") from None


def _write_tables(results_dir: Path, name: str) -> None:
    written = write_report(results_dir, name)
    if written:
        print("Tables and plots: " + ", ".join(_show(p) for p in written), flush=True)


def _rank_text(trial: Trial) -> str:
    if not trial.rank_setting:
        return ", no rank"
    return ", " + ", ".join(f"{k} {v}" for k, v in trial.rank_setting.items())


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != STATUS_OK:
        return f": {record['reason']}"
    result = record["result"]
    score = (result.get("eval") or {}).get("accuracy")
    return (f": peak {result.get('peak_memory_mb')} MiB ({result.get('peak_memory_kind')}), "
            f"train {result.get('train_seconds')} s, eval loss {result.get('eval_loss')}"
            + (f", accuracy {score:.3f}" if isinstance(score, float) else ""))


def _eta(durations: list[float], remaining: int, slots: int) -> str:
    if not durations or remaining <= 0:
        return ""
    seconds = sum(durations) / len(durations) * remaining / max(1, slots)
    return f"; ETA {int(seconds // 60)}m{int(seconds % 60):02d}s from {len(durations)} finished trial(s)"


def _command(trial: Trial, sweep_dir: Path) -> str:
    script = _show(trial.script)
    return shlex.join(["python", script, *trial.argv, "--output_dir", _show(sweep_dir / trial.trial_id / "run")])


def _show(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text.strip("/").replace("/", "_")) or "sweep"
