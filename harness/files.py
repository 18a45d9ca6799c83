"""Writing files whole and knowing them by hash: a reader never sees half a file (temporary file, fsync,
rename), and a data file or download is identified by its sha256. Light on purpose: commands that only read
and write tables import it without torch."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from harness.errors import UserError


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def output_file(text: str | None, overwrite: bool, example: str = "") -> Path | None:
    """A tool's --output FILE, checked before any work: None (print to stdout) when not given; refused in one
    line when it is a folder, its folder is missing, or it exists and --overwrite was not passed."""
    if not text:
        return None
    output = Path(text)
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name" + (f", e.g. {example}" if example else ""))
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: folder {output.parent} does not exist; make it first or write elsewhere")
    if output.exists() and not overwrite:
        raise UserError(f"--output {output} exists; pass --overwrite to replace it, or write elsewhere")
    return output


def write_or_print(text: str, output: Path | None) -> None:
    """The page on stdout, or written whole to `output` (output_file's) and said so."""
    if output is None:
        print(text, end="")
    else:
        write_text_atomic(output, text)
        print(f"wrote {output}")


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (data files and downloaded wheels run to 100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
