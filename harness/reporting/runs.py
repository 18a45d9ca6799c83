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
from typing import Any

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


def read_records(path: Path, warn=None) -> list[dict[str, Any]]:
    """Every complete record, in the order written. Unreadable lines are skipped with a one-line
    warning each (a truncated last line is the expected case after a machine crash)."""
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
        if isinstance(record, dict):
            records.append(record)
        else:
            warn(f"{path}: line {number} is not a JSON object; skipped")
    return records
