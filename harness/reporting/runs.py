"""results/runs.jsonl: the append-only log of benchmark trials, one JSON object per line.

Appending is one os.write of a whole line to a file opened with O_APPEND, under an exclusive
fcntl lock, then fsync: a crash, a kill or Ctrl-C leaves either the whole line or (at worst, if the
machine itself dies mid-write) a truncated last line, which readers skip with a warning.
Earlier lines are never rewritten.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

RUNS_FILE = "runs.jsonl"
# Settings that only say where a trial ran or how it printed: they never make two trials different
# (harness.bench leaves them out of a trial's hash, harness.reporting.tables out of an experiment's settings).
LOCATION_SETTINGS = frozenset({"output_dir", "run_name", "logging_dir", "disable_tqdm"})


def append_record(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, ensure_ascii=False, sort_keys=False, default=str) + "\n"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_RDWR, not O_WRONLY: the torn-line check below reads the file's last byte.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # two sweeps writing to one results folder never interleave
        try:
            # A line cut short by an earlier crash has no newline: start on a fresh line, so this
            # record stays readable (the cut one is skipped by readers).
            if _ends_without_newline(fd):
                line = "\n" + line
            data = line.encode("utf-8")
            written = os.write(fd, data)
            if written != len(data):  # a full disk; never leave a silent half record
                raise OSError(f"only {written} of {len(data)} bytes of the record reached {path}")
            os.fsync(fd)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _ends_without_newline(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def read_records(path: Path, warn=None, check: Callable[[dict], str | None] | None = None) -> list[dict[str, Any]]:
    """Every complete record, in the order written. Unreadable lines are skipped with a one-line
    warning each (a truncated last line is the expected case after a machine crash), and so are those
    check (e.g. trial_record_problem) finds a problem with."""
    path = Path(path)
    if not path.is_file():
        return []
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    records = []
    lines = path.read_bytes().split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            where = "its last line" if number >= len(lines) - 1 else f"line {number}"
            warn(f"{path}: {where} is not a complete record (cut short by a crash?); skipped, the rest is kept")
            continue
        if not isinstance(record, dict):
            warn(f"{path}: line {number} is not a JSON object; skipped")
        elif check is not None and (problem := check(record)):
            warn(f"{path}: line {number} is not a trial record as harness.bench writes it ({problem}); "
                 "skipped, the rest is kept")
        else:
            records.append(record)
    return records


# ---------------------------------------------------------------------------- what a trial record holds

# The fields that make a line a harness.bench trial record (a line without them is another tool's or
# added by hand, and is skipped as such by harness.reporting.tables.trial_records).
TRIAL_FIELDS = ("sweep", "trial_hash", "trial_id", "status", "recipe", "method", "seed")

TEXT, WHOLE, NUMBER, SCALAR = "text", "a whole number", "a number", "text or a number"
# Every field of a trial record that harness.bench (resume) and harness.report read, with its type; a
# nested dict is the schema of a dict field ({}: any dict). Any field may be missing or null, but those of
# TRIAL_FIELDS. A line whose field has another type is skipped (with a warning naming the line), so that
# one bad line never stops the report of a whole folder.
TRIAL_SCHEMA: dict[str, Any] = {
    "sweep": TEXT, "trial_hash": TEXT, "trial_id": TEXT, "status": TEXT, "recipe": TEXT, "method": TEXT,
    "seed": WHOLE, "reason": TEXT, "model": TEXT, "rank": WHOLE, "scored_on": TEXT, "started_at": TEXT,
    "finished_at": TEXT, "bench_command": TEXT, "trial_dir": TEXT, "cpu_threads": WHOLE,
    "wall_seconds": NUMBER, "process_peak_rss_mb": NUMBER,
    "axes": {},
    "rank_setting": {"r": WHOLE, "init_r": WHOLE, "target_r": WHOLE},
    "budgets": {"trial_timeout_s": NUMBER, "memory_gb": NUMBER},
    "ran_on": {"executor": TEXT, "host": TEXT, "slots": WHOLE, "gpu": SCALAR},
    "result": {
        **dict.fromkeys(("peak_memory_mb", "cuda_reserved_mb", "cuda_allocated_mb", "nvml_used_mb", "train_seconds",
                         "total_seconds", "tokens_per_second", "trainable_params", "trainable_percent", "adapter_bytes",
                         "model_bytes", "train_loss", "eval_loss", "global_step", "total_params"), NUMBER),
        **dict.fromkeys(("peak_memory_kind", "nvml_used_source", "stopped_by", "device", "quantization", "method",
                         "memory_budget_enforced"), TEXT),
        "memory_plan": {"planned_peak_mb": NUMBER, "cuda_context_mb": NUMBER},
        "forgetting": {"delta": NUMBER},
        "eval": {},  # only its numbers are read
        "config": {"max_steps": NUMBER},  # the rest is shown as written
        "git": {"commit": TEXT},
        "versions": {},
    },
}


def trial_record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the types of a trial record's fields (None: nothing; a line that is not a trial
    record at all is left to trial_records)."""
    if not all(record.get(k) is not None for k in TRIAL_FIELDS):
        return None
    return _problem(record, TRIAL_SCHEMA, "")


def _problem(values: dict[str, Any], schema: dict[str, Any], prefix: str) -> str | None:
    for key, kind in schema.items():
        value = values.get(key)
        if value is None:
            continue
        name = f"{prefix}{key}"
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                return _wrong(name, value, "a JSON object")
            if (inner := _problem(value, kind, f"{name}.")) is not None:
                return inner
        elif not _is(value, kind):
            return _wrong(name, value, kind)
    return None


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):  # JSON's true/false are neither text nor numbers
        return False
    number = isinstance(value, (int, float))
    return {TEXT: isinstance(value, str), WHOLE: isinstance(value, int), NUMBER: number,
            SCALAR: number or isinstance(value, str)}[kind]


def _wrong(name: str, value: Any, kind: str) -> str:
    shown = json.dumps(value, ensure_ascii=True)
    return f"its {name} is {shown[:40] + '...' if len(shown) > 40 else shown}, not {kind}"
