"""Reading a run's data: files (JSON, JSONL, CSV, Parquet) and Hub datasets into rows, the rows each task can use
(and those left out, counted), the fixed-seed train/validation split, the forgetting probe's texts, and what
identifies a data file in a run's fingerprint. harness.data.examples lays rows out as prompts; harness.data.encoding
turns a run's rows of every format into the datasets it trains on."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.data import formats, gsm8k, preference
from harness.data.formats import detect_format, load_hub_rows, read_parquet
from harness.errors import UserError
from harness.files import file_sha256
from harness.run.config import DataArguments, find_file

PROMPT_FORMATS = ("human_assistant", "chat_template", "alpaca", "auto")
# An eval set above this many rows, uncapped, is said to be large: scoring it can take longer than a short run
# trains (a 1-step trial scoring 5,000 rows), so the run says so and names --eval_max_samples.
LARGE_EVAL_ROWS = 1_000
# The columns an instruction row's content is in (harness.data.formats' formats): what makes two rows the same
# example, whatever ids or metadata they carry beside.
_CONTENT_COLUMNS = ("instruction", "input", "output", "system", "history", "conversations", "messages", "tools",
                    "prompt", "completion", "text")


# ---------------------------------------------------------------------------- reading

def read_table(path: str, option: str = "--data_file") -> list[dict[str, Any]]:
    """Rows of a CSV, JSON (array of objects) or JSONL file; `option` is the setting that named it."""
    if not str(path or "").strip():
        raise UserError(f"{option} is empty; pass a CSV, JSON or JSONL file")
    found = find_file(path)
    if found is not None and found.is_dir():
        raise UserError(f"data file {path} is a folder; pass {option} with a CSV, JSON, JSONL or Parquet file"
                        + (", or the folder as --dataset_name" if option == "--data_file" else ""))
    if found is None or not found.is_file():
        raise UserError(f"data file {path} not found; pass {option} with a CSV, JSON or JSONL file")
    suffix = found.suffix.lower()
    try:
        if suffix == ".csv":
            import pandas as pd

            # keep_default_na=False: a review that says "NA" stays text, not a missing value
            frame = pd.read_csv(found, dtype=str, keep_default_na=False, encoding="utf-8")
            rows = frame.to_dict(orient="records")
        elif suffix == ".jsonl":
            rows = _read_jsonl(found)
        elif suffix == ".json":
            rows = json.loads(found.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and len(rows) == 1:  # {"train": [...]}
                rows = next(iter(rows.values()))
        elif suffix == ".parquet":

            rows = read_parquet(str(found))
        else:
            raise UserError(f"data file {found}: unknown format {suffix!r}; use .csv, .json, .jsonl or .parquet")
    except UserError:
        raise
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data file {found} could not be read ({first_line}); check it is valid {suffix[1:]}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise UserError(f"data file {found} must hold a list of records (objects with named fields)")
    if not rows:
        raise UserError(f"data file {found} holds no rows")
    return rows


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as exc:  # the file's line, not the position inside the one record
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise UserError(
                    f"data file {path}, line {number}: not a valid JSON record ({reason}); fix or delete that line"
                ) from None
    return rows


def _text(value: Any) -> str:
    """A field's text; a missing or null field (None in JSON) is empty, never the text "None"."""
    return "" if value is None else str(value).strip()


# ---------------------------------------------------------------------------- examples


@dataclass
class RecordFile:
    """The usable records of one data file, and the rows left out because they have no text."""

    path: str
    rows: list[dict[str, Any]]
    total: int  # rows read (after --max_samples)
    left_out: list[int] = field(default_factory=list)  # 1-based row numbers
    reason: str = ""
    same_answers: list[int] = field(default_factory=list)  # preference pairs whose chosen and rejected are the same
    also_trained: list[int] = field(default_factory=list)  # --eval_file rows the run also trains on (split_records)

    def summary(self) -> str:
        return (f"left out {len(self.left_out)} of {self.total} rows of {self.path} with {self.reason} "
                f"({_numbered(self.left_out)}); they are neither trained on nor evaluated")

    def report(self) -> dict[str, Any]:
        """For result.json: how many rows were left out and which (the first 100); pairs with the same two answers
        and eval rows that are training rows too, when there are any (the run keeps and scores them, as given)."""
        report = {"count": len(self.left_out), "rows": self.left_out[:100], "reason": self.reason or None}
        if self.same_answers:
            report["pairs_with_the_same_answers"] = {"count": len(self.same_answers), "of": len(self.rows),
                                                     "rows": self.same_answers[:100]}
        if self.also_trained:
            report["rows_also_trained_on"] = {"count": len(self.also_trained), "of": len(self.rows),
                                              "rows": self.also_trained[:100]}
        return report

    def row_numbers(self) -> list[int]:
        """The 1-based number in the file of each of self.rows (the rows left out are skipped)."""
        skipped = set(self.left_out)
        return [n for n in range(1, self.total + 1) if n not in skipped]


def data_source(args: DataArguments) -> str:
    """What the run's training data is read from: --dataset_name when given, else --data_file."""
    return args.dataset_name or args.data_file


def load_records(args: DataArguments, option: str = "--data_file") -> RecordFile:
    """The rows the run will use, checked against the task's needs, in file order."""
    if option == "--data_file" and args.dataset_name:

        rows = load_hub_rows(args.dataset_name, args.dataset_config, args.dataset_split)
        args = dataclasses.replace(args, data_file=args.dataset_name)  # named so in every message and count
    else:
        rows = read_table(args.data_file, option)
    if args.max_samples is not None:  # >= 1: harness.run.checks
        rows = rows[: args.max_samples]
    if args.task == "classification":
        kept, reason = _check_classification_rows(rows, args)
    elif args.task == "instruction":
        kept, reason = _check_instruction_rows(rows, args)
    elif args.task in ("preference", "math"):  # DPO's pairs, GRPO's problems: a bad row is refused, not left out

        checked = (preference if args.task == "preference" else gsm8k).checked_rows(rows, args.data_file)
        record = RecordFile(args.data_file, checked, len(rows))
        if args.task == "preference":  # (checked_rows refuses a file where every pair is so)
            record.same_answers = preference.same_answer_rows(checked)
        if record.same_answers:
            print(f"Data: {len(record.same_answers)} of {len(checked)} pairs of {args.data_file} have the same chosen "
                  f"and rejected answer ({_numbered(record.same_answers)}): they teach DPO nothing and are kept as "
                  "given (recorded in result.json); give them a different rejected answer or delete them")
        return record
    else:
        raise UserError(f"unknown --task {args.task!r}; use classification or instruction")
    kept_ids = {id(row) for row in kept}
    left_out = [number for number, row in enumerate(rows, start=1) if id(row) not in kept_ids]
    return RecordFile(args.data_file, kept, len(rows), left_out, reason if left_out else "")


def label_set(args: DataArguments) -> list[str]:
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise UserError(f"--labels needs at least two comma-separated labels, got {args.labels!r}")
    if len(set(labels)) < len(labels):
        raise UserError(f"--labels names a label twice ({args.labels!r}); give each label once")
    return labels


def _check_classification_rows(rows: list[dict], args: DataArguments) -> tuple[list[dict], str]:
    missing = [c for c in (args.text_column, args.label_column) if c not in rows[0]]
    if missing:
        raise UserError(
            f"data file {args.data_file} has no column {', '.join(map(repr, missing))} "
            f"(it has {', '.join(map(repr, rows[0]))}); pass --text_column / --label_column"
        )
    known = label_set(args)
    kept = []
    for number, row in enumerate(rows, start=1):
        label = str(row.get(args.label_column, "")).strip()
        if label not in known:
            raise UserError(
                f"data file {args.data_file}, row {number}: label {label!r} is not one of {', '.join(known)}; "
                "fix the row or pass --labels with the full label set"
            )
        if _text(row.get(args.text_column)):
            kept.append(row)
    if not kept:
        raise UserError(f"data file {args.data_file}: no row has text in column {args.text_column!r}")
    return kept, f"no text in column {args.text_column!r}"


def _check_instruction_rows(rows: list[dict], args: DataArguments) -> tuple[list[dict], str]:
    """Supervised rows in one of harness.data.formats' formats: a conversation a chat template cannot train on is refused
    naming its row; Alpaca rows without instruction or output, and text rows without text, are left out and counted."""
    fmt = sft_format(rows, args)
    if fmt == "alpaca":
        mapping = column_mapping(args)
        kept = [r for r in rows if formats.usable_alpaca(r, mapping)]
        reason = "an empty or missing instruction or output"
    elif fmt == "text":
        kept = [r for r in rows if _text(r.get("text"))]
        reason = "no text"
    elif fmt == "prompt_completion" and not formats.is_conversational(rows[0]):
        for number, row in enumerate(rows, start=1):
            if not _text(row.get("completion")):
                raise UserError(f"data file {args.data_file}, row {number}: the completion is empty; fill it in or "
                                "delete the row")
        kept, reason = list(rows), ""
    else:
        formats.read_conversations(rows, fmt, args.data_file, column_mapping(args))  # refuses a bad row
        kept, reason = list(rows), ""
    if not kept:
        raise UserError(f"data file {args.data_file}: no usable rows ({reason})")
    return kept, reason


def sft_format(rows: list[dict], args: DataArguments) -> str:
    """The supervised format of the rows (harness.data.formats.FORMATS), from their columns or --column_mapping."""
    return detect_format(rows, args.data_file, column_mapping(args))


def column_mapping(args: DataArguments) -> dict | None:
    """--column_mapping: LLaMA-Factory's dataset_info entry, as JSON text or a .json file holding it."""
    text = (args.column_mapping or "").strip()
    if not text:
        return None
    source = "--column_mapping"
    if not text.startswith("{"):
        found = find_file(text)
        if found is None or not found.is_file():
            raise UserError(f"--column_mapping {text!r} is neither a JSON object nor a .json file that exists")
        text, source = found.read_text(encoding="utf-8"), f"--column_mapping file {found}"
    try:
        mapping = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{source} is not valid JSON ({exc}); pass one dataset_info entry, e.g. "
                        '{"formatting": "sharegpt", "columns": {"messages": "conversations"}}') from None
    if not isinstance(mapping, dict):
        raise UserError(f"{source} must be a JSON object (one dataset_info entry)")
    return mapping


def load_forgetting_records(args: DataArguments) -> RecordFile | None:
    """--forgetting_file's instruction records (their responses are the general text), or None when off."""
    if not args.forgetting_file or not args.forgetting_samples:
        return None
    return load_records(
        dataclasses.replace(args, data_file=args.forgetting_file, task="instruction", max_samples=None),
        "--forgetting_file")


def seen_texts(rows: list[dict]) -> set[str]:
    """Every text field of the rows a run trains on, stripped, conversations' turns included: what a held-out probe
    must not contain."""
    seen: set[str] = set()
    for row in rows:
        for value in row.values():
            # a field's text, or one level into a list: a conversation's turns, Alpaca history's [user, answer] pairs
            items = value if isinstance(value, list) else [value]
            for item in items:
                parts = item.values() if isinstance(item, dict) else item if isinstance(item, list) else [item]
                seen.update(p.strip() for p in parts if isinstance(p, str) and p.strip())
    return seen


def load_eval_records(args: DataArguments) -> RecordFile | None:
    """--eval_file's records, or None without one."""
    if not args.eval_file:
        return None
    return load_records(dataclasses.replace(args, data_file=args.eval_file, max_samples=None), "--eval_file")


def split_records(rows: list[dict], args: DataArguments, eval_records: RecordFile | None = None) -> tuple[list[dict], list[dict]]:
    """A fixed-seed train/validation split, the same one datasets' train_test_split makes.
    With --eval_file, that file's records (eval_records, when already loaded) are the validation set
    and every row trains; one that is all training rows is refused, one that holds some is stated (check_held_out).
    validation_split is in [0, 1) (harness.run.checks). A large eval set is stated in one line (LARGE_EVAL_ROWS);
    --eval_max_samples caps what is scored of it (each objective's prepare), not the rows held out."""
    if args.eval_file:
        eval_records = eval_records or load_eval_records(args)
        check_held_out(rows, eval_records, args)
        _say_size(len(eval_records.rows), "--eval_file", args)
        return rows, eval_records.rows
    n_eval = math.ceil(args.validation_split * len(rows))
    if n_eval == 0:
        return rows, []
    if n_eval >= len(rows):
        raise UserError(
            f"only {len(rows)} rows: --validation_split {args.validation_split} leaves nothing to train on"
        )
    from datasets import Dataset

    # Indices, not the rows: the split is then independent of the columns' types.
    split = Dataset.from_dict({"i": list(range(len(rows)))}).train_test_split(test_size=n_eval, seed=args.split_seed)
    _say_size(n_eval, f"the validation split (--validation_split {args.validation_split:g})", args)
    return [rows[i] for i in split["train"]["i"]], [rows[i] for i in split["test"]["i"]]


def _say_size(count: int, what: str, args: DataArguments) -> None:
    """One line when a large eval set will be scored whole: a short run may spend most of its time there."""
    if args.eval_max_samples is None and count > LARGE_EVAL_ROWS:
        print(f"Data: {what} holds {count:,} rows, every one scored at each evaluation; --eval_max_samples N scores "
              "only the first N")


def check_held_out(train_rows: list[dict], eval_records: RecordFile, args: DataArguments) -> None:
    """Refuse an --eval_file whose every row is a training row (the training file itself, most often); state the
    eval rows that are training rows too, in one line and in eval_records (for result.json). They are kept and
    scored, as given: the line and the record say their scores are not held-out. Rows are compared by their content
    (harness.data.formats' columns, or the classification text), whitespace and key order aside."""
    content = _content_columns(args)
    trained = {_row_key(row, args, content) for row in train_rows}
    numbers = eval_records.row_numbers()
    also = [n for n, row in zip(numbers, eval_records.rows) if _row_key(row, args, content) in trained]
    if not also:
        return
    fix = (f"pass --eval_file with rows the run does not train on, or leave it out to hold out --validation_split of "
           f"{data_source(args)}")
    if len(also) == len(eval_records.rows):
        eval_hash = data_identity(args.eval_file)["data_sha256"]
        if eval_hash is not None and eval_hash == data_identity(data_source(args))["data_sha256"]:
            raise UserError(f"--eval_file {args.eval_file} is the training file ({data_source(args)}), so its scores "
                            f"would not be held-out; {fix}")
        raise UserError(f"all {len(also)} rows of --eval_file {args.eval_file} are also training rows, so its scores "
                        f"would not be held-out; {fix}")
    eval_records.also_trained = also
    are, their = ("is also a training row", "its score is") if len(also) == 1 else ("are also training rows",
                                                                                   "their scores are")
    print(f"Data: {len(also)} of {len(eval_records.rows)} --eval_file rows {are} ({_numbered(also)}): {their} not "
          "held-out (kept and scored as given, and recorded in result.json); delete them from the file for held-out "
          "scores")


def _content_columns(args: DataArguments) -> set[str]:
    if args.task != "instruction":
        return set()
    mapping = column_mapping(args) or {}
    named = (mapping.get("columns") or {}).values() if isinstance(mapping.get("columns"), dict) else ()
    return set(_CONTENT_COLUMNS) | {name for name in named if isinstance(name, str)}


def _row_key(row: dict, args: DataArguments, content: set[str]) -> bytes:
    """What makes two rows the same example: a classification row's text, an instruction row's content columns,
    a checked preference pair or math problem whole; hashed, so a large file's keys stay small."""
    if args.task == "classification":
        value = row.get(args.text_column)
    elif args.task == "instruction":
        value = {k: v for k, v in row.items() if k in content} or row
    else:
        value = row
    return hashlib.sha256(json.dumps(_normalized(value), sort_keys=True, ensure_ascii=False).encode()).digest()


def _normalized(value: Any) -> Any:
    """Text with its whitespace collapsed, numbers as text (a CSV's "3" is a JSON file's 3), nulls dropped from
    records (Parquet adds them for fields other rows have)."""
    if isinstance(value, str):
        return " ".join(value.split())
    if isinstance(value, dict):
        return {str(k): _normalized(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return "" if value is None else str(value)


def _numbered(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:20])) + (", ..." if len(numbers) > 20 else "")
    return f"{'rows' if len(numbers) > 1 else 'row'} {shown}"


# ---------------------------------------------------------------------------- prompt layout


# ---------------------------------------------------------------------------- tokenization


def data_identity(path: str) -> dict[str, Any]:
    """Name and content hash (sha256, None when there is no such file) of a data file, or of a local dataset folder
    (its files' names and hashes, hidden ones and datasets' caches aside), for result.json provenance and a run's
    fingerprint (harness.run.folder). A Hub dataset id has none: it is named, not hashed."""
    import hashlib


    found = find_file(path) if path else None
    if found is not None and found.is_dir():
        files = sorted(f for f in found.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(found).parts))[:100_000]
        listing = "".join(f"{f.relative_to(found).as_posix()}\t{file_sha256(f)}\n" for f in files)
        return {"data_file": path, "data_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if found is None or not found.is_file():
        return {"data_file": path, "data_sha256": None}
    return {"data_file": path, "data_sha256": file_sha256(found)}
