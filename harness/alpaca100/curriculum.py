"""Curriculum training: easy answers first, then medium, then hard, one saved adapter per stage.

Buckets, by the record's answer:
  easy    fewer than 50 words
  medium  50 to 120 words
  hard    more than 120 words, or code or math anywhere in the record (whatever its length)

Stages: 1 trains on easy, 2 on easy + medium, 3 on easy + medium + hard. Each stage is one
ordinary training run (harness.run.flow.train) in its own folder, on its own data file, starting
from the adapter the previous stage saved, so every stage has its own result.json and adapter.
A stage whose bucket is empty adds nothing and is skipped. Without --curriculum the same records
train in one shuffled run ("single_pass"), for a like-for-like comparison.

Reruns: a stage already finished (status ok, same data) is reused, a stage cut short resumes from
its last checkpoint. --start_stage N rolls back: stages N and later are moved aside (renamed
*.rolled-back-<time>, never deleted) and retrained from the adapter stage N-1 saved.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.alpaca100.select import word_count
from harness.data.reading import data_identity
from harness.errors import UserError
from harness.files import write_json_atomic
from harness.run.config import _help
from harness.run.flow import train
from harness.run.folder import RESULT_FILE

EASY_MAX_WORDS = 50  # an answer with fewer words is easy
MEDIUM_MAX_WORDS = 120  # ... with at most this many, medium; longer, hard
BUCKETS = ("easy", "medium", "hard")
SINGLE_PASS = "single_pass"

# Code: fenced blocks, definitions, imports, markup tags, calls ending in ; or {, lines ending in a brace.
CODE_PATTERN = re.compile(
    r"```"
    r"|^\s*(def|class)\s+\w+.*:\s*$"
    r"|^\s*(import\s+[\w.]+|from\s+[\w.]+\s+import\s+\w+|#include\s*<)"
    r"|</?(html|head|body|div|span|p|a|ul|ol|li|table|tr|td|script|style|h[1-6])\b[^<>]*>"
    r"|\w+\([^()\n]*\)\s*[{;]|[{}]\s*$|\bconsole\.log\(|\bprint\("
    r"|\b(SELECT\s+.+\s+FROM|INSERT\s+INTO|CREATE\s+TABLE)\b",
    re.MULTILINE,
)
# Math: arithmetic between numbers (a minus only with spaces, so dates and ranges are not math),
# equations in single-letter variables, LaTeX, or the words for them.
MATH_PATTERN = re.compile(
    r"\d\s*[+*/^×÷=]\s*\(?\d|\d\s+-\s+\d|(?<!\w)[a-z]\s*[=^]\s*[-(\d]|(?<!\w)[a-z]\s*[+*/]\s*[a-z](?!\w)"
    r"|\\(frac|sqrt|sum|int)\b|\$[^$\n]+\$"
    r"|\b([Ee]quation|[Tt]heorem|[Pp]olynomial|[Ss]olve for|[Ss]quare root|[Ll]ogarithm)s?\b",
)


@dataclass
class CurriculumArguments:
    curriculum: bool = field(
        default=False,
        metadata=_help(
            "Train in stages: easy (answer < 50 words), + medium (50-120), + hard (> 120, or code/math), "
            "saving the adapter after each. Off: the same records in one shuffled run."
        ),
    )
    start_stage: str | None = field(
        default=None,
        metadata=_help(
            "Roll back to this stage (1/2/3 or easy/medium/hard) and retrain from it, starting from the "
            "adapter the stage before saved; later stages' folders are moved aside. Unset: reuse "
            "finished stages, resume an unfinished one."
        ),
    )


# ---------------------------------------------------------------------------- buckets

def has_code(text: str) -> bool:
    return bool(CODE_PATTERN.search(text))


def has_math(text: str) -> bool:
    return bool(MATH_PATTERN.search(text))


def bucket_of(record: dict[str, Any]) -> str:
    output = str(record.get("output") or "")
    whole = "\n".join(str(record.get(k) or "") for k in ("instruction", "input", "output"))
    words = word_count(output)
    if words > MEDIUM_MAX_WORDS or has_code(whole) or has_math(whole):
        return "hard"
    return "easy" if words < EASY_MAX_WORDS else "medium"


@dataclass
class Stage:
    number: int  # 1-based; single_pass is 1
    name: str  # easy / medium / hard / single_pass
    records: list[dict[str, Any]]  # everything this stage trains on
    added: int  # records new in this stage

    @property
    def folder(self) -> str:
        return self.name if self.name == SINGLE_PASS else f"stage{self.number}_{self.name}"


def plan_stages(records: list[dict[str, Any]], curriculum: bool) -> list[Stage]:
    """The stages to train, in order; empty curriculum stages are left out (they would repeat the last)."""
    if not curriculum:
        return [Stage(1, SINGLE_PASS, list(records), len(records))]
    by_bucket = {name: [r for r in records if bucket_of(r) == name] for name in BUCKETS}
    stages, so_far = [], []
    for number, name in enumerate(BUCKETS, start=1):
        so_far = so_far + by_bucket[name]
        if by_bucket[name]:
            stages.append(Stage(number, name, so_far, len(by_bucket[name])))
    return stages


def bucket_counts(records: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(BUCKETS, 0)
    for record in records:
        counts[bucket_of(record)] += 1
    return counts


def stage_number(spec: str | None) -> int | None:
    if spec is None or spec == "":
        return None
    if spec in BUCKETS:
        return BUCKETS.index(spec) + 1
    if spec.isdigit() and 1 <= int(spec) <= len(BUCKETS):
        return int(spec)
    raise UserError(f"--start_stage {spec!r}: use 1, 2, 3 or easy, medium, hard")


# ---------------------------------------------------------------------------- training

def train_stages(cfg, stages: list[Stage], out_dir: Path, eval_file: str | None, start_stage: str | None) -> list[dict]:
    """Train every stage (see the module doc for reuse, resume and roll-back); their result records."""
    start = stage_number(start_stage)
    if start is not None and stages and stages[0].name == SINGLE_PASS:
        raise UserError("--start_stage needs --curriculum (a single pass has no stages to roll back to)")
    if start is not None:
        _check_start(stages, start, out_dir)
        _roll_back([s for s in stages if s.number >= start], out_dir)

    records, previous_adapter = [], None
    for stage in stages:
        stage_dir = out_dir / stage.folder
        data_file = out_dir / "data" / f"{stage.folder}.json"
        write_json_atomic(data_file, stage.records)
        done = _finished_record(stage_dir / RESULT_FILE)
        if done is not None and done.get("data", {}).get("data_sha256") != data_identity(str(data_file))["data_sha256"]:
            raise UserError(
                f"{stage_dir} was trained on other records than this run selects; pass another --output_dir, "
                "or --start_stage 1 to retrain every stage (the old folders are kept)"
            )
        if done is not None:
            print(f"\n== Stage {stage.folder}: already trained ({len(stage.records)} records); reusing {stage_dir}")
            record = done
        else:
            print(f"\n== Stage {stage.folder}: {len(stage.records)} records ({stage.added} new)"
                  + (f", starting from {previous_adapter}" if previous_adapter else ""))
            stage_cfg = dataclasses.replace(
                cfg,
                data=dataclasses.replace(cfg.data, data_file=str(data_file), max_samples=None,
                                         validation_split=0.0, eval_file=eval_file),
                run=dataclasses.replace(cfg.run, init_adapter=str(previous_adapter) if previous_adapter else None),
                train=dataclasses.replace(cfg.train, output_dir=str(stage_dir)),
            )
            record = train(stage_cfg)
        records.append({"stage": stage.folder, "records": len(stage.records), "added": stage.added, **record})
        previous_adapter = stage_dir
    return records


def _finished_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if record.get("status") == "ok" else None


def _check_start(stages: list[Stage], start: int, out_dir: Path) -> None:
    if not any(s.number == start for s in stages):
        planned = ", ".join(f"{s.number} ({s.name})" for s in stages)
        raise UserError(f"--start_stage {start}: that stage has no records in this selection; stages: {planned}")
    before = [s for s in stages if s.number < start]
    if before and _finished_record(out_dir / before[-1].folder / RESULT_FILE) is None:
        raise UserError(
            f"--start_stage {start} needs the adapter of stage {before[-1].folder}, which {out_dir} does not hold "
            "finished; start from an earlier stage"
        )


def _roll_back(stages: list[Stage], out_dir: Path) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for stage in stages:
        folder = out_dir / stage.folder
        if folder.exists():
            kept = folder.with_name(f"{folder.name}.rolled-back-{stamp}")
            folder.rename(kept)
            print(f"Rolled back {folder.name}: moved to {kept.name}")
