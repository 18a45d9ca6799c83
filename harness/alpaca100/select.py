"""Pick the k most valuable instruction records: long, detailed, complex, and well rated where rated.

Every record gets one number, its value:

    value = (conversation words + response_weight x response words
             + complexity_weight x instruction complexity) x score

  conversation words      words of instruction + input + output (a CJK character counts as a word)
  response words          words of the output alone: "Long Is More for Alignment" (Zhao et al. 2024)
                          found the longest responses make the best small instruction sets
  instruction complexity  how much the instruction asks for: its sentences, its constraint words
                          ("must", "at least", "compare", "step", ...) and whether it has an input
  score                   the record's rating when the data has one (--score_field), else 1

The top k by value are kept; ties go to the record that comes first in the file, and a prompt
that occurs more than once (same instruction and input) counts once, in its most valuable version,
so the selection is the same on every run. Works on any Alpaca-style file, the full 52k alpaca_data.json included.

    python -m harness.select --data_file data/alpaca_en_demo.json --select_k 100 --output_dir outputs/selection

writes selected.json (the chosen records, best first, as they are in the file), selection_scores.csv
(every record's signals, value, rank and whether it was chosen) and selection.png (length against
score or value, the chosen records highlighted).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.data.reading import read_table
from harness.errors import UserError, reported_as_one_line
from harness.files import write_json_atomic, write_text_atomic
from harness.run.config import _help
from harness.run.parsing import parse_dataclasses

SELECTED_FILE = "selected.json"
SCORES_FILE = "selection_scores.csv"
PLOT_FILE = "selection.png"

# Rating fields looked for by --score_field auto, in this order.
SCORE_FIELD_NAMES = ("score", "quality_score", "quality", "rating", "reward")

# Words that add a requirement to an instruction. A heuristic: it only has to rank "Write a poem"
# below "Write a poem of at least 12 lines that must rhyme and compare two seasons".
CONSTRAINT_PATTERN = re.compile(
    r"\b(must|should|at least|at most|exactly|only|without|include|including|each|every|format|"
    r"step|steps|compare|contrast|explain|justify|list|table|example|examples|words|sentences|"
    r"paragraphs?|bullet|code|function|program|calculate|prove|analy[sz]e)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"[.?!;:]+(?=\s|$)|\n+")
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]|[^\s\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")


@dataclass
class SelectionArguments:
    select_k: int = field(default=100, metadata=_help("How many records to keep (the top k by value)."))
    score_field: str = field(
        default="auto",
        metadata=_help(
            "Field holding a rating that multiplies each record's value. auto: the first of "
            f"{', '.join(SCORE_FIELD_NAMES)} the data has, none if it has none; none: ignore ratings."
        ),
    )
    response_weight: float = field(
        default=1.0, metadata=_help("Extra weight of response words on top of conversation words (Long Is More).")
    )
    complexity_weight: float = field(
        default=5.0, metadata=_help("Words one instruction-complexity point is worth.")
    )


@dataclass
class SelectCommandArguments:
    data_file: str = field(
        default="data/alpaca_en_demo.json",
        metadata=_help("Alpaca-style JSON/JSONL/CSV (instruction, input, output), e.g. the full alpaca_data.json."),
    )
    output_dir: str = field(default="outputs/selection", metadata=_help("Where the selection files go."))
    overwrite: bool = field(
        default=False, metadata=_help("Replace the selection files already in output_dir (otherwise refused).")
    )


# ---------------------------------------------------------------------------- signals

def word_count(text: str) -> int:
    return len(_WORD.findall(text or ""))


def instruction_complexity(instruction: str, given_input: str = "") -> int:
    """Sentences + constraint words + 1 when there is an input to work on."""
    sentences = len([s for s in _SENTENCE_END.split(instruction.strip()) if s.strip()])
    return sentences + len(CONSTRAINT_PATTERN.findall(instruction)) + int(bool(given_input.strip()))


def record_text(record: dict[str, Any]) -> tuple[str, str, str]:
    return (str(record.get("instruction") or ""), str(record.get("input") or ""), str(record.get("output") or ""))


@dataclass
class ScoredRecord:
    index: int  # position in the file (0-based): the tie-breaker
    conversation_words: int
    response_words: int
    complexity: int
    score: float | None
    value: float
    duplicate_of: int | None = None
    rank: int | None = None  # 1 = most valuable; None when not selected

    @property
    def selected(self) -> bool:
        return self.rank is not None


@dataclass
class Selection:
    records: list[dict[str, Any]]  # the chosen records, best first, unchanged
    scored: list[ScoredRecord]  # every record, file order
    score_field: str | None
    k: int

    def summary(self) -> dict[str, Any]:
        chosen = [s for s in self.scored if s.selected]
        return {
            "pool": len(self.scored),
            "selected": len(chosen),
            "duplicates_skipped": sum(s.duplicate_of is not None for s in self.scored),
            "score_field": self.score_field,
            "selected_indices": [s.index for s in sorted(chosen, key=lambda s: s.rank)],
            "min_selected_value": min((s.value for s in chosen), default=None),
            "mean_selected_response_words": round(sum(s.response_words for s in chosen) / len(chosen), 1) if chosen else None,
            "mean_pool_response_words": round(sum(s.response_words for s in self.scored) / len(self.scored), 1),
        }


def resolve_score_field(rows: list[dict], requested: str) -> str | None:
    if requested == "none":
        return None
    if requested == "auto":
        return next((name for name in SCORE_FIELD_NAMES if name in rows[0]), None)
    if requested not in rows[0]:
        raise UserError(
            f"--score_field {requested!r}: the data has no such field (it has {', '.join(map(repr, rows[0]))}); "
            "name one of them, or pass --score_field none"
        )
    return requested


def _rating(row: dict, name: str, number: int) -> float:
    raw = row.get(name)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(
            f"record {number}: score field {name!r} is {raw!r}; every record needs a number >= 0 there "
            "(rescale negative ratings), or pass --score_field none"
        )
    return value


def check_selection(args: SelectionArguments) -> None:
    """The selection settings' ranges, checkable before any data is read."""
    if args.select_k < 1:
        raise UserError(f"--select_k must be at least 1, got {args.select_k}")
    for name in ("response_weight", "complexity_weight"):
        if not getattr(args, name) >= 0:  # a negative weight would rank the shortest, simplest records first
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")


def select_records(rows: list[dict[str, Any]], args: SelectionArguments) -> Selection:
    """Score every record and keep the top k. Deterministic: ties go to the earlier record."""
    check_selection(args)
    if not rows or "instruction" not in rows[0] or "output" not in rows[0]:
        raise UserError("selection needs Alpaca-style records with instruction/input/output fields; pass "
                        "--data_file with such records (e.g. data/alpaca_en_demo.json)")
    score_field = resolve_score_field(rows, args.score_field)
    scored: list[ScoredRecord] = []
    best_of_prompt: dict[tuple[str, str], ScoredRecord] = {}
    for index, row in enumerate(rows):
        instruction, given, output = record_text(row)
        score = _rating(row, score_field, index + 1) if score_field else None
        response = word_count(output)
        complexity = instruction_complexity(instruction, given)
        conversation = word_count(instruction) + word_count(given) + response
        value = (conversation + args.response_weight * response + args.complexity_weight * complexity) * (
            score if score is not None else 1.0
        )
        record = ScoredRecord(index, conversation, response, complexity, score, round(value, 6))
        scored.append(record)
        # A repeated prompt counts once: its most valuable version (the earliest among equals).
        prompt = (instruction.strip(), given.strip())
        kept = best_of_prompt.setdefault(prompt, record)
        if record.value > kept.value:
            best_of_prompt[prompt] = record
    for record in scored:
        best = best_of_prompt[(record_text(rows[record.index])[0].strip(), record_text(rows[record.index])[1].strip())]
        record.duplicate_of = None if best is record else best.index
    candidates = [s for s in scored if s.duplicate_of is None]
    if args.select_k > len(candidates):
        raise UserError(
            f"--select_k {args.select_k} but only {len(candidates)} distinct records are available; "
            "lower --select_k or use a larger --data_file"
        )
    ranked = sorted(candidates, key=lambda s: (-s.value, s.index))[: args.select_k]
    for rank, s in enumerate(ranked, start=1):
        s.rank = rank
    return Selection([rows[s.index] for s in ranked], scored, score_field, args.select_k)


# ---------------------------------------------------------------------------- files

def write_selection(selection: Selection, out_dir: Path, title: str = "") -> dict[str, str]:
    """selected.json, selection_scores.csv and selection.png in out_dir (each written atomically)."""
    import pandas as pd


    out_dir = Path(out_dir)
    write_json_atomic(out_dir / SELECTED_FILE, selection.records)
    frame = pd.DataFrame([{**vars(s), "selected": s.selected} for s in selection.scored])
    if selection.score_field is None:
        frame = frame.drop(columns="score")
    write_text_atomic(out_dir / SCORES_FILE, frame.to_csv(index=False))
    plot_selection(selection, out_dir / PLOT_FILE, title)
    return {"selected": str(out_dir / SELECTED_FILE), "scores": str(out_dir / SCORES_FILE),
            "plot": str(out_dir / PLOT_FILE)}


def plot_selection(selection: Selection, path: Path, title: str = "") -> None:
    """Conversation length against the rating (or, unrated, the value), chosen records highlighted."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    rated = selection.score_field is not None
    def y(s: ScoredRecord) -> float:
        return s.score if rated else s.value

    rest = [s for s in selection.scored if not s.selected]
    chosen = [s for s in selection.scored if s.selected]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([s.conversation_words for s in rest], [y(s) for s in rest], s=8, c="#9e9e9e", alpha=0.6,
               label=f"not selected ({len(rest)})")
    ax.scatter([s.conversation_words for s in chosen], [y(s) for s in chosen], s=14, c="#d62728",
               label=f"selected top {len(chosen)}")
    ax.set_xlabel("conversation length (words: instruction + input + output)")
    ax.set_ylabel(f"rating ({selection.score_field})" if rated else "selection value")
    ax.set_title(title or f"Selection: top {len(chosen)} of {len(selection.scored)} records", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    # Rendered to a file beside the target, then renamed: a reader never sees half a PNG.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        fig.savefig(partial, format="png")
        os.replace(partial, path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)


def check_output_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that cannot take the selection files, or one holding an earlier selection."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} is a file, not a folder; pass a folder for the selection files")
    earlier = [name for name in (SELECTED_FILE, SCORES_FILE, PLOT_FILE) if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise UserError(
            f"--output_dir {out_dir} already holds a selection ({', '.join(earlier)}); pass another --output_dir, "
            "or --overwrite true to replace it"
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --output_dir {out_dir} ({exc.strerror}); pass a writable folder") from None
    if not os.access(out_dir, os.W_OK):
        raise UserError(f"--output_dir {out_dir} is not writable; pass a folder you can write to")


def main(argv: list[str] | None = None) -> None:
    with reported_as_one_line("harness.select"):
        command, args = parse_dataclasses((SelectCommandArguments, SelectionArguments), argv)
        out_dir = Path(command.output_dir).expanduser()
        rows = read_table(command.data_file)
        selection = select_records(rows, args)
        check_output_dir(out_dir, command.overwrite)
        files = write_selection(selection, out_dir, f"{command.data_file}: top {args.select_k} of {len(rows)} records")
        summary = selection.summary()
        print(f"Selected {summary['selected']} of {summary['pool']} records "
              f"({summary['duplicates_skipped']} duplicate prompts skipped; rating field: {summary['score_field']}); "
              f"mean response {summary['mean_selected_response_words']} words vs {summary['mean_pool_response_words']} in the pool")
        for kind, path in files.items():
            print(f"  {kind}: {path}")


if __name__ == "__main__":
    main()
