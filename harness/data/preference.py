"""Preference pairs for DPO, read from LLaMA-Factory's ShareGPT preference format or TRL's standard ones
and put into TRL's form: prompt / chosen / rejected, as conversations or as plain text.

  LLaMA-Factory  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...],
                  "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}    (earlier turns and a system turn kept)
  TRL, text      {"prompt": "...", "chosen": "...", "rejected": "..."}
  TRL, chat      {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  TRL, implicit  {"chosen": [messages], "rejected": [messages]}       (the shared first turns are the prompt)

A pair that cannot be used (no chosen or rejected, an empty side, an empty prompt, a turn of another role)
is refused with its row number: a preference file is small and every pair was chosen by hand or by a judge,
so a broken one is a mistake to fix, not a row to drop silently.
"""
from __future__ import annotations

from typing import Any

from harness.errors import UserError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = ("system", "user", "assistant")


def checked_rows(rows: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """Every row as a TRL preference pair; one line naming the row for the first that is not one, and for a file
    whose every pair has the same chosen and rejected answer (harness.data.reading counts and reports fewer)."""
    pairs = [_pair(row, f"data file {path}, row {number}") for number, row in enumerate(rows, start=1)]
    if len({isinstance(pair["prompt"], list) for pair in pairs}) > 1:
        raise UserError(f"data file {path} mixes conversations and plain-text pairs; convert them to one format")
    if len(same_answer_rows(pairs)) == len(pairs):
        every = "its one pair has" if len(pairs) == 1 else f"all {len(pairs)} pairs have"
        raise UserError(f"data file {path}: {every} the same chosen and rejected answer, so there is no preference "
                        "to learn; give each pair a rejected answer that differs from the chosen one")
    return pairs


def same_answer_rows(pairs: list[dict[str, Any]]) -> list[int]:
    """The 1-based rows whose chosen and rejected answers are the same (whitespace aside). DPO learns from the
    difference between the two answers' likelihoods, which such a pair does not have (its sigmoid loss is log 2
    whatever the model does), and it can never count as preferred when scored."""
    return [number for number, pair in enumerate(pairs, start=1)
            if _answer_text(pair["chosen"]) == _answer_text(pair["rejected"])]


def _answer_text(answer: Any) -> Any:
    if isinstance(answer, str):
        return " ".join(answer.split())
    return [(m["role"], " ".join(m["content"].split())) for m in answer]


def is_conversational(pairs: list[dict[str, Any]]) -> bool:
    return bool(pairs) and isinstance(pairs[0]["prompt"], list)


def _pair(row: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [side for side in ("chosen", "rejected") if side not in row]
    if missing:
        raise UserError(
            f"{where} has no {' and no '.join(missing)} (its fields: {', '.join(sorted(map(str, row)))[:200]}); a "
            "preference pair needs chosen and rejected, and conversations (LLaMA-Factory's ShareGPT format) or a "
            "prompt (TRL's format)"
        )
    if "conversations" in row:
        pair = _from_sharegpt(row, where)
    elif "prompt" in row:
        pair = _from_trl(row, where)
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        pair = _from_implicit(row, where)
    else:
        raise UserError(f"{where} has chosen and rejected but no prompt or conversations to answer")
    for part in ("prompt", "chosen", "rejected"):
        if not _text_of(pair[part]):
            what = "the prompt" if part == "prompt" else f"the {part} answer"
            raise UserError(f"{where}: {what} is empty; fix the pair or delete the row")
    return pair


def _from_sharegpt(row: dict[str, Any], where: str) -> dict[str, Any]:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: conversations must be a non-empty list of {{from, value}} turns")
    prompt = [_sharegpt_turn(turn, where) for turn in turns]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
        prompt.insert(0, {"role": "system", "content": system})
    if prompt[-1]["role"] != "user":
        raise UserError(f"{where}: the conversation must end with a human turn, which chosen and rejected answer")
    chosen, rejected = (_sharegpt_answer(row[side], side, where) for side in ("chosen", "rejected"))
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}


def _sharegpt_turn(turn: Any, where: str) -> dict[str, str]:
    if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
        raise UserError(f"{where}: every turn must be an object with from and a text value")
    role = SHAREGPT_ROLES.get(str(turn.get("from")))
    if role is None:
        raise UserError(f"{where}: a turn from {turn.get('from')!r} (only system, human and gpt turns are supported)")
    return {"role": role, "content": turn["value"]}


def _sharegpt_answer(answer: Any, side: str, where: str) -> dict[str, str]:
    text = answer.get("value") if isinstance(answer, dict) else answer
    if not isinstance(text, str):
        raise UserError(f"{where}: {side} must be a {{from: gpt, value: text}} object or a text")
    return {"role": "assistant", "content": text}


def _from_trl(row: dict[str, Any], where: str) -> dict[str, Any]:
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if all(isinstance(part, str) for part in (prompt, chosen, rejected)):
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if all(isinstance(part, list) for part in (prompt, chosen, rejected)):
        return {part: _messages(row[part], part, where) for part in ("prompt", "chosen", "rejected")}
    raise UserError(f"{where}: prompt, chosen and rejected must all be texts or all be lists of messages")


def _from_implicit(row: dict[str, Any], where: str) -> dict[str, Any]:
    chosen, rejected = _messages(row["chosen"], "chosen", where), _messages(row["rejected"], "rejected", where)
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise UserError(f"{where}: chosen and rejected share no first turns to use as the prompt; add a prompt field")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _messages(messages: Any, part: str, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"{where}: {part} must be a list of {{role: system|user|assistant, content: text}} messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _text_of(part: Any) -> str:
    if isinstance(part, str):
        return part.strip()
    return "".join(m["content"] for m in part).strip()
