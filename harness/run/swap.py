"""A finished run's files and its record change together, as one unit, however the process ends.

A run writes its final files (adapter or model, tokenizer) into a staging folder. Finishing moves them into
output_dir one by one, removes the previous finished run's files that this run did not write, and writes
result.json. A kill in the middle of that (kill -9, power loss) would leave one run's weights beside another
run's record. So the swap is journaled: before the first move, the whole plan (what moves, what goes, the new
record) is written to output_dir/.finishing.json, atomically; every step after it can be done again; and the
journal goes only after result.json is written. A journal found later (the next run into the folder, under its
lock) is rolled forward: the swap completes exactly as planned. Readers of the folder (harness.infer, merge)
refuse it while the journal is there. Every loop here is over the journal's own short lists.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.files import write_json_atomic

JOURNAL_FILE = ".finishing.json"


def _step(what: str) -> None:
    """Between two steps of a swap: nothing. Tests make it stop the swap there, as a kill would."""


def plain_names(names: Any) -> list[str]:
    """The journal's file names, only plain names inside the folder: a damaged or edited journal must not make a
    swap move or delete anything elsewhere."""
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")]


def swap_in(out: Path, staging: Path, record: dict[str, Any], old_files: list[str]) -> None:
    """Move the staged files into `out`, remove `old_files` this run did not write, write `record` as result.json;
    journaled, so that a stop at any point is completed by roll_forward."""
    staged = sorted(p.name for p in staging.iterdir()) if staging.is_dir() else []
    record["files"] = staged
    journal = {"staging": staging.name, "staged": staged, "old_files": old_files, "record": record}
    write_json_atomic(out / JOURNAL_FILE, journal)  # from here on the swap is decided
    _step("journal written")
    _complete(out, journal)


def _complete(out: Path, journal: dict[str, Any]) -> None:
    staging = out / Path(str(journal.get("staging", ""))).name
    staged = plain_names(journal.get("staged"))
    for name in staged:
        source = staging / name
        if not (source.exists() or source.is_symlink()):
            continue  # moved before the stop
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(source, target)
        _step(f"moved {name}")
    for name in sorted(set(plain_names(journal.get("old_files"))) - set(staged)):
        stale = out / name
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        _step(f"removed {name}")
    write_json_atomic(out / "result.json", journal["record"])
    _step("record written")
    if staging.is_dir() and staging != out:
        shutil.rmtree(staging, ignore_errors=True)
    (out / JOURNAL_FILE).unlink(missing_ok=True)


def pending_record(out: Path) -> dict[str, Any] | None:
    """The record a swap left half-done in `out` will write, or None when there is no such swap."""
    journal = _read_journal(out)
    return journal["record"] if journal else None


def roll_forward(out: Path) -> bool:
    """Complete a swap a stopped run left half-done in `out` (call it holding the folder's lock). True if there
    was one."""
    journal = _read_journal(out)
    if journal is None:
        return False
    _complete(out, journal)
    print(f"{out}: completed moving in the files of the run stopped while finishing "
          f"(started {journal['record'].get('started_at')}); the folder holds that run, whole")
    return True


def refuse_while_swapping(folder: Path) -> None:
    """For readers: a folder in the middle of a swap holds parts of two runs."""
    if (folder / JOURNAL_FILE).exists():
        raise UserError(f"{folder} was left half-way through moving in a finished run's files (its process was "
                        "stopped); rerun that run's command to complete it, then use the folder")


def _read_journal(out: Path) -> dict[str, Any] | None:
    path = out / JOURNAL_FILE
    if not path.exists():
        return None
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        journal = None
    if not isinstance(journal, dict) or not isinstance(journal.get("record"), dict):
        # write_json_atomic renames a whole file into place: a damaged journal was not written by a swap.
        raise UserError(f"{path} is damaged (it is not a swap this project wrote); look at the folder, then delete "
                        "that file")
    return journal
