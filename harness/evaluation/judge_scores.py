"""A judge's scores: the four dimensions, reading them from a reply (a JSON object or "Name: n" lines), and the
tables the alpaca100 experiment reports (per dimension, per skill, per difficulty band). harness.evaluation.judge
asks the judge."""
from __future__ import annotations

import json
import math
import re
from typing import Any

DIMENSIONS = ("helpfulness", "relevance", "accuracy", "level_of_detail")


DIMENSION_NAMES = {"helpfulness": "Helpfulness", "relevance": "Relevance", "accuracy": "Accuracy",
                   "level_of_detail": "Level of detail"}


_KEY_ALIASES = {
    "helpfulness": "helpfulness", "helpful": "helpfulness",
    "relevance": "relevance", "relevant": "relevance",
    "accuracy": "accuracy", "accurate": "accuracy", "correctness": "accuracy",
    "level_of_detail": "level_of_detail", "level of detail": "level_of_detail", "detail": "level_of_detail",
    "details": "level_of_detail", "level-of-detail": "level_of_detail", "detailedness": "level_of_detail",
}


_LINE = re.compile(
    r"(helpfulness|helpful|relevance|relevant|accuracy|accurate|correctness|level[ _-]of[ _-]detail|details?)"
    r"\W{0,6}?\s*(\d+(?:\.\d+)?)\s*(?:/\s*5)?",
    re.IGNORECASE,
)


_SCALE_NOTE = re.compile(r"\(\s*(?:on a scale of\s*|from\s*|out of\s*)?1\s*(?:-|–|to)\s*5\s*\)|\(\s*out of 5\s*\)", re.IGNORECASE)


def parse_scores(text: str) -> dict[str, float] | None:
    """The four scores from a judge's reply (a JSON object, or "Name: n" lines), or None."""
    text = _SCALE_NOTE.sub("", text or "")  # "Helpfulness (1-5): 4" must read 4, not 1
    found: dict[str, float] = {}
    for candidate in re.findall(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(obj, dict):
            for key, value in obj.items():
                name = _KEY_ALIASES.get(str(key).strip().lower().replace("_", " ")) or _KEY_ALIASES.get(str(key).strip().lower())
                if name and isinstance(value, (int, float, str)):
                    try:
                        found.setdefault(name, float(value))
                    except ValueError:
                        pass
    if len(found) < len(DIMENSIONS):
        for name, value in _LINE.findall(text):
            key = _KEY_ALIASES.get(re.sub(r"[ _-]", " ", name.lower())) or _KEY_ALIASES.get(name.lower())
            if key:
                found.setdefault(key, float(value))
    if set(found) != set(DIMENSIONS) or not all(1 <= v <= 5 for v in found.values()):
        return None
    return {d: found[d] for d in DIMENSIONS}


# Difficulty 1-10 of the Evol-Instruct test set, in three bands.
DIFFICULTY_BANDS = ((1, 3, "easy (1-3)"), (4, 6, "medium (4-6)"), (7, 10, "hard (7-10)"))


# The source guide's overall judge scores on this test set (GPT-4o-mini judge), to read ours against.
GUIDE_REFERENCE_LEVELS = {"simple": 2.4, "medium": 4.15, "strong": 4.4}


def difficulty_band(difficulty: int | None) -> str:
    for low, high, name in DIFFICULTY_BANDS:
        if difficulty is not None and low <= difficulty <= high:
            return name
    return "unknown"


def score_frame(rows: list[dict[str, Any]]):
    """A pandas frame of judged answers: one row each, a column per dimension plus their mean."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    for dimension in DIMENSIONS:
        frame[dimension] = [r["scores"][dimension] if r.get("scores") else math.nan for r in rows]
    frame["mean"] = frame[list(DIMENSIONS)].mean(axis=1, skipna=False)
    return frame


def summary_tables(frame) -> dict[str, Any]:
    """Mean scores per dimension, per skill and per difficulty band (unparseable answers left out, counted)."""
    ok = frame[frame["status"] == "ok"]
    columns = [*DIMENSIONS, "mean"]

    def grouped(by: str):
        table = ok.groupby(by)[columns].mean().round(3)
        table.insert(0, "answers", ok.groupby(by).size())
        return table

    return {
        "per_dimension": ok[columns].mean().round(3).to_dict(),
        "answers": int(len(frame)),
        "unparseable": int((frame["status"] != "ok").sum()),
        "per_skill": grouped("skill"),
        "per_difficulty": grouped("band"),
    }
