"""GSM8K problems for GRPO: reading them, their reference answers, and where a completion gives its answer.

A GSM8K solution ends with a line `#### <number>`, the reference answer. A completion is read the two
ways lm-evaluation-harness scores GSM8K: strictly (the number after its last `####`, the place the prompt
asks for) and flexibly (that number, or else the last number the completion writes).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from harness.errors import UserError

ANSWER_MARK = "####"
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_MARKED = re.compile(ANSWER_MARK + r"\s*(" + _NUMBER + ")")


def canonical_number(text: str) -> str | None:
    """'1,000' -> '1000', '$18.50' -> '18.5', '-3' -> '-3'; None when text is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    value = value.normalize()
    return str(value.quantize(Decimal(1))) if value == value.to_integral_value() else format(value, "f")


def reference_answer(solution: str) -> str | None:
    """The number after the solution's `####`, canonical; None when there is none."""
    if ANSWER_MARK not in solution:
        return None
    return canonical_number(solution.rsplit(ANSWER_MARK, 1)[1])


def marked_answer(completion: str) -> str | None:
    """The number after the completion's last `####` (strict), canonical; None when it gives none there."""
    found = _MARKED.findall(completion)
    return canonical_number(found[-1]) if found else None


def final_answer(completion: str) -> str | None:
    """The marked answer, or else the last number in the completion (flexible)."""
    marked = marked_answer(completion)
    if marked is not None:
        return marked
    numbers = re.findall(_NUMBER, completion)
    return canonical_number(numbers[-1]) if numbers else None


def checked_rows(rows: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """Rows with question and answer; answer must end in `#### <number>`. Kept: question, the reference
    number (answer) and the worked solution (solution)."""
    out = []
    for number, row in enumerate(rows, start=1):
        where = f"data file {path}, row {number}"
        question, solution = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip() or not isinstance(solution, str):
            raise UserError(f"{where} needs a question and an answer text (GSM8K's fields; it has: "
                            f"{', '.join(sorted(map(str, row)))[:200]})")
        reference = reference_answer(solution)
        if reference is None:
            raise UserError(f"{where}: the answer has no `{ANSWER_MARK} <number>` to score against "
                            f"(it ends: {solution.strip()[-60:]!r}); fix or delete the row")
        out.append({"question": question.strip(), "answer": reference, "solution": solution})
    return out
