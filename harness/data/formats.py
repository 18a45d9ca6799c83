"""The data formats people have for supervised fine-tuning, detected from their columns, as conversations.

Stanford Alpaca and LLaMA-Factory's (alpaca, sharegpt), OpenAI's chat messages, TRL's prompt/completion
and plain text for continued pre-training; FORMAT_COLUMNS says which columns make each. One format per
file. LLaMA-Factory's dataset_info.json entry for a file (`mapping`) renames columns and role tags, as
LLaMA-Factory reads it. Rows come from harness.data.reading.read_table (CSV/JSON/JSONL), read_parquet or
load_hub_rows; nothing here needs a tokenizer (harness.data.chat turns conversations into tokens).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError, first_line
from harness.run.config import find_file

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
FORMAT_COLUMNS = {
    "alpaca": "instruction + output (optional input, system, history)",
    "sharegpt": "conversations: [{from, value}] (optional system, tools)",
    "messages": "messages: [{role, content}] (optional tools)",
    "prompt_completion": "prompt + completion (both text, or both lists of messages)",
    "text": "text",
}
# The columns that make a row's format, in the order they are tried: a row may carry others too (an Alpaca
# file often has a "text" column as well, so text comes last).
_DETECT = (("preference", ("chosen", "rejected")), ("sharegpt", ("conversations",)), ("messages", ("messages",)),
           ("prompt_completion", ("prompt", "completion")), ("alpaca", ("instruction", "output")), ("text", ("text",)))
_ACCEPTED = "; ".join(f"{name}: {cols}" for name, cols in FORMAT_COLUMNS.items())

# LLaMA-Factory's defaults (its DatasetAttr). history, system and tools have none there: with a mapping
# they are read only when the mapping names them; without one, columns of these names are read.
_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
            "system": "system", "messages": "conversations", "tools": "tools"}
_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
         "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}


@dataclass
class Conversation:
    """Chat-template messages ({role, content}, an assistant turn may carry tool_calls) and the tools offered."""

    messages: list[dict]
    tools: list[dict] | None = None


def _where(path: str, row_number: int | None) -> str:
    return f"data file {path}" + (f", row {row_number}" if row_number is not None else "")


def _text(value: Any) -> str:
    """A field's text, as harness.data.reading reads instructions: a missing or null field is empty, not "None"."""
    return "" if value is None else str(value).strip()


# ---------------------------------------------------------------------------- reading

def read_parquet(path: str) -> list[dict[str, Any]]:
    """Rows of a Parquet file as plain Python values (nested lists and structs included)."""
    found = find_file(path) if str(path or "").strip() else None
    if found is None or not found.is_file():
        raise UserError(f"data file {path} not found; pass a Parquet, CSV, JSON or JSONL file")
    try:
        import pyarrow.parquet as pq

        # pyarrow, not pandas: pandas hands nested columns (messages) back as numpy arrays, not lists
        rows = pq.read_table(found).to_pylist()
    except Exception as exc:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for a bad file
        raise UserError(f"data file {found} could not be read as Parquet ({first_line(exc)})") from None
    if not rows:
        raise UserError(f"data file {found} holds no rows")
    return rows


@contextlib.contextmanager
def datasets_quiet():
    """datasets draws progress bars and logs while it loads; a failure is reported as one line instead."""
    import datasets
    from huggingface_hub.utils import logging as hub_logging

    loggers = datasets.utils.logging, hub_logging
    bars, levels = datasets.utils.logging.is_progress_bar_enabled(), [log.get_verbosity() for log in loggers]
    datasets.disable_progress_bars()
    for log in loggers:
        log.set_verbosity_error()
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def load_hub_rows(name: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """Rows of datasets.load_dataset(name, config, split=split): a Hub id or a local folder of data files."""
    if not str(name or "").strip():
        raise UserError("the dataset name is empty; pass a Hub dataset id or a local folder of data files")
    try:
        with datasets_quiet():
            from datasets import load_dataset

            rows = load_dataset(name, config, split=split).to_list()
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        # DatasetGenerationError only says "An error occurred"; the reason is in its cause
        reason = first_line(exc.__cause__ if exc.__cause__ is not None and "error occurred" in str(exc) else exc)
        reason = reason[:-1] if reason.endswith(".") else reason  # a ";" follows
        named = "should be one of" in reason.lower() or "available:" in reason.lower()  # splits or configs it has
        hint = ("pass one of those it names" if named else
                "check the name (a Hub id, or a local folder of JSON/JSONL/CSV/Parquet files) and your network")
        where = name + (f" ({config})" if config else "") + f", split {split!r}"
        raise UserError(f"dataset {where} could not be loaded: {reason}; {hint}") from None
    if not rows:
        raise UserError(f"dataset {name}, split {split!r} holds no rows")
    return rows


# ---------------------------------------------------------------------------- which format

def _mapping_parts(mapping: dict | None, path: str) -> tuple[str | None, dict, dict]:
    """(format, columns, tags) for reading rows; the format is None without a mapping."""
    if mapping is None:
        return None, dict(_COLUMNS), dict(_TAGS)
    what = f"data file {path}: the dataset_info mapping"
    if not isinstance(mapping, dict):
        raise UserError(f"{what} must be an object with formatting, columns and tags; it is a {type(mapping).__name__}")
    if mapping.get("ranking"):
        raise UserError(f"{what} declares preference pairs (ranking); use the DPO recipe, not supervised fine-tuning")
    fmt = mapping.get("formatting", "alpaca")  # LLaMA-Factory's default
    if fmt not in ("alpaca", "sharegpt"):
        raise UserError(f"{what} has formatting {fmt!r}; use alpaca or sharegpt")
    given_columns, given_tags = mapping.get("columns") or {}, mapping.get("tags") or {}
    for kind, given, known in (("columns", given_columns, _COLUMNS), ("tags", given_tags, _TAGS)):
        if not isinstance(given, dict):
            raise UserError(f"{what}: {kind} must be an object of names")
        unknown = [k for k in given if k not in known]
        if unknown:
            raise UserError(f"{what} names {kind} {', '.join(map(repr, unknown))}, which supervised fine-tuning "
                            f"on text does not read; it reads {', '.join(known)}")
        bad = [k for k, v in given.items() if not isinstance(v, str) or not v]
        if bad:
            raise UserError(f"{what}: {kind} {', '.join(map(repr, bad))} must name a column or tag as text")
    return fmt, {**_COLUMNS, "history": None, "system": None, "tools": None, **given_columns}, {**_TAGS, **given_tags}


def _row_format(row: dict) -> str | None:
    return next((fmt for fmt, keys in _DETECT if all(key in row for key in keys)), None)


def is_conversational(row: dict) -> bool:
    """A prompt_completion row whose prompt and completion are message lists (else they are plain text)."""
    return isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list)


def _prompt_completion_kind(row: dict, path: str, number: int) -> str:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return "conversational"
    if isinstance(prompt, str) and isinstance(completion, str):
        return "plain"
    raise UserError(f"{_where(path, number)}: prompt and completion must both be text or both be lists of "
                    f"messages; they are {type(prompt).__name__} and {type(completion).__name__}")


def detect_format(rows: list[dict], path: str, mapping: dict | None = None) -> str:
    """The rows' format (one of FORMATS), from their columns, or the mapping's; refuses a file that mixes formats."""
    if not rows:
        raise UserError(f"data file {path} holds no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise UserError(f"{_where(path, number)} is a {type(row).__name__}, not a record with named fields")
    fmt, columns, _ = _mapping_parts(mapping, path)
    if fmt is not None:
        needed = [columns["prompt"], columns["response"]] if fmt == "alpaca" else [columns["messages"]]
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise UserError(f"data file {path} has no column {', '.join(map(repr, missing))} that its {fmt} mapping "
                            f"names (it has {', '.join(map(repr, rows[0]))}); fix the mapping's columns")
        return fmt
    first = _row_format(rows[0])
    if first == "preference":
        raise UserError(f"data file {path} holds preference pairs (chosen/rejected columns), not supervised "
                        "fine-tuning data; train on it with --task preference (recipes/qwen2_5_0_5b_dpo.py)")
    if first is None:
        raise UserError(f"data file {path} has columns {', '.join(map(repr, rows[0])) or 'none'}, which fit no "
                        f"supervised format; use one of: {_ACCEPTED}")
    kind = _prompt_completion_kind(rows[0], path, 1) if first == "prompt_completion" else None
    for number, row in enumerate(rows[1:], start=2):
        found = _row_format(row)
        # A row that fits no format is left to the reader (an Alpaca row without output is left out, not refused).
        if found is not None and found != first:
            raise UserError(f"{_where(path, number)} mixes formats: its columns ({', '.join(map(repr, row))}) are "
                            f"{found}, row 1's are {first}; use one format per file")
        if kind is not None and found == first and _prompt_completion_kind(row, path, number) != kind:
            other = "plain" if kind == "conversational" else "conversational"
            raise UserError(f"{_where(path, number)} mixes formats: its prompt/completion are {other}, row 1's "
                            f"are {kind}; use one kind per file")
    return first


# ---------------------------------------------------------------------------- rows to conversations

def usable_alpaca(row: dict, mapping: dict | None = None) -> bool:
    """Whether an Alpaca row has an instruction and an output; harness.data.reading leaves the others out and counts them."""
    _, columns, _ = _mapping_parts(mapping, "")
    return bool(_text(row.get(columns["prompt"]))) and bool(_text(row.get(columns["response"])))


def _tools(value: Any, where: str) -> list[dict] | None:
    """The tools column (a JSON string or a list) as chat templates take it; empty means none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise UserError(f"{where}: the tools column is not valid JSON ({first_line(exc)}); "
                            "fix it or leave it empty") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise UserError(f"{where}: the tools column must be a list of tool descriptions (JSON objects)")
    # LLaMA-Factory stores bare {name, description, parameters}; chat templates document {type, function}
    tools = [t if "function" in t else {"type": "function", "function": t} for t in value]
    return tools or None


def _arguments(value: Any, where: str) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise UserError(f"{where}: a function call's arguments are not valid JSON ({first_line(exc)}); "
                            "fix the row") from None
    return {} if value is None else value


def _function_calls(value: Any, where: str) -> list[dict]:
    """A ShareGPT function_call turn's value ({"name", "arguments"} or a list of them, as JSON) as tool_calls."""
    try:
        calls = json.loads(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise UserError(f"{where}: the function_call is not valid JSON ({first_line(exc)}); "
                        'write it as {"name": ..., "arguments": {...}}') from None
    calls = [calls] if isinstance(calls, dict) else calls
    if not isinstance(calls, list) or not calls or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] for c in calls):
        raise UserError(f'{where}: the function_call must be {{"name": ..., "arguments": {{...}}}} (or a list of them)')
    return [{"type": "function", "function": {"name": c["name"], "arguments": _arguments(c.get("arguments"), where)}}
            for c in calls]


def _call(call: Any, where: str) -> Any:
    """OpenAI writes a call's arguments as a JSON string; chat templates expect an object."""
    if not (isinstance(call, dict) and isinstance(call.get("function"), dict)):
        return call  # check_conversation refuses it
    return {**call, "function": {**call["function"], "arguments": _arguments(call["function"].get("arguments"), where)}}


def _check_content(turn: dict, field: str, role: Any, calls: Any, where: str) -> None:
    """Refuse a turn without content, naming its row, turn and field: an assistant turn with no answer (None, the
    field missing, or blank) unless it makes tool calls, any other turn with no text at all (None or missing).
    A blank user or system turn is kept: it is valid, if odd, and the chat template writes it."""
    content = turn.get(field)
    blank = isinstance(content, str) and not content.strip()
    if content is not None and not (role == "assistant" and blank):
        return  # content that is not text is refused by check_conversation, naming its type
    if role == "assistant" and calls:
        return  # a turn that only calls a tool
    why = f'no "{field}" field' if field not in turn else f'"{field}" is null' if content is None else f'"{field}" is blank'
    if role == "assistant":
        state = "missing" if content is None else "empty"
        raise UserError(f"{where}: the assistant's answer is {state} ({why}); give it the answer or delete the row")
    raise UserError(f"{where}: the {role if isinstance(role, str) else 'turn'}'s text is missing ({why}); "
                    "give it its text or delete the row")


def _message(message: Any, where: str) -> dict:
    """An OpenAI-style message, cleaned of the nulls that Parquet/datasets add for fields other rows have."""
    if not isinstance(message, dict):
        raise UserError(f"{where} is a {type(message).__name__}, not a {{role, content}} object")
    _check_content(message, "content", message.get("role"), message.get("tool_calls"), where)
    out = {k: v for k, v in message.items() if v is not None or k == "content"}
    if out.get("content") is None and out.get("tool_calls"):
        out["content"] = ""
    if isinstance(out.get("tool_calls"), list):
        out["tool_calls"] = [_call(call, where) for call in out["tool_calls"]]
    return out


def _message_list(value: Any, column: str, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise UserError(f"{where}: column {column!r} must be a list of {{role, content}} messages, "
                        f"not {type(value).__name__}")
    # a prompt/completion row numbers its messages per column: "completion message 1", not 3 of the whole
    label = "message" if column == "messages" else f"{column} message"
    return [_message(m, f"{where}, {label} {k}") for k, m in enumerate(value, start=1)]


def _system(row: dict, columns: dict) -> list[dict]:
    """The system column (LLaMA-Factory's), as the conversation's first message."""
    system = _text(row.get(columns["system"])) if columns["system"] else ""
    return [{"role": "system", "content": system}] if system else []


def _alpaca(row: dict, columns: dict, where: str) -> list[dict]:
    messages = _system(row, columns)
    history = row.get(columns["history"]) if columns["history"] else None
    if history:
        if not isinstance(history, list):
            raise UserError(f"{where}: history must be a list of [instruction, answer] pairs")
        for k, pair in enumerate(history, start=1):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
                raise UserError(f"{where}: history entry {k} must be a pair [instruction, answer] of texts")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, given = _text(row.get(columns["prompt"])), _text(row.get(columns["query"]))
    # "\n\n" as harness.data.reading lays out an instruction and its input in a chat turn (LLaMA-Factory uses "\n")
    messages.append({"role": "user", "content": f"{instruction}\n\n{given}" if given else instruction})
    messages.append({"role": "assistant", "content": _text(row.get(columns["response"]))})
    return messages


def _sharegpt(row: dict, columns: dict, tags: dict, where: str) -> list[dict]:
    turns = row.get(columns["messages"])
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    if not isinstance(turns, list):
        raise UserError(f"{where}: column {columns['messages']!r} must be a list of "
                        f"{{{role_tag}, {content_tag}}} turns, not {type(turns).__name__}")
    roles = {tags["user_tag"]: "user", "user": "user", tags["assistant_tag"]: "assistant", "assistant": "assistant",
             tags["system_tag"]: "system", tags["observation_tag"]: "tool", tags["function_tag"]: "function_call"}
    messages = _system(row, columns)
    for k, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or role_tag not in turn:
            has = f"keys {', '.join(map(repr, turn))}" if isinstance(turn, dict) else f"a {type(turn).__name__}"
            raise UserError(f"{where}, turn {k}: expected a {{{role_tag}, {content_tag}}} object, it has {has}; "
                            "a dataset_info mapping's tags rename them (role_tag, content_tag)")
        role, content = roles.get(turn[role_tag]) if isinstance(turn[role_tag], str) else None, turn.get(content_tag)
        if role is None:
            raise UserError(f"{where}, turn {k}: unknown {role_tag} {turn[role_tag]!r}; use "
                            f"{', '.join(sorted(set(map(str, roles))))}")
        if role == "function_call":
            messages.append({"role": "assistant", "content": "",
                             "tool_calls": _function_calls(content, f"{where}, turn {k}")})
        else:
            # here, where the turn's own number is known (a system column adds a message before the turns)
            _check_content(turn, content_tag, role, None, f"{where}, turn {k}")
            messages.append({"role": role, "content": content})
    return messages


def to_conversation(row: dict, fmt: str, mapping: dict | None = None, *, path: str = "",
                    row_number: int | None = None) -> Conversation:
    """The row as chat messages. A row that cannot be read as `fmt` is refused (path and row_number name it)."""
    where = _where(path or "(rows)", row_number)
    _, columns, tags = _mapping_parts(mapping, path)
    if fmt == "alpaca":
        messages = _alpaca(row, columns, where)
    elif fmt == "sharegpt":
        messages = _sharegpt(row, columns, tags, where)
    elif fmt == "messages":
        messages = _message_list(row.get("messages"), "messages", where)
    elif fmt == "prompt_completion" and is_conversational(row):
        messages = _message_list(row["prompt"], "prompt", where) + _message_list(row["completion"], "completion", where)
    else:  # plain prompt/completion and text are text, not conversations: the caller tokenizes them as they are
        raise ValueError(f"{fmt} rows{' with plain text' if fmt == 'prompt_completion' else ''} are not conversations")
    tools_column = columns["tools"]
    return Conversation(messages, _tools(row.get(tools_column), where) if tools_column else None)


def _is_call(call: Any) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    return isinstance(function, dict) and isinstance(function.get("name"), str) and isinstance(
        function.get("arguments", {}), dict)


def check_conversation(conv: Conversation, path: str, row_number: int | None) -> None:
    """Refuse a conversation a chat template cannot train on, naming the row and what to fix."""
    where = _where(path, row_number)
    if not conv.messages:
        raise UserError(f"{where}: the conversation is empty; give it a user turn and an assistant answer")
    for k, message in enumerate(conv.messages, start=1):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise UserError(f"{where}, message {k}: unknown role {role!r}; use {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise UserError(f"{where}, message {k}: the {role}'s content is a {type(content).__name__}, not text "
                            "(images and other content parts are not supported); write it as a string")
        calls = message.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list) or not all(map(_is_call, calls))):
            raise UserError(f"{where}, message {k}: malformed tool_calls; an assistant's tool_calls are "
                            '[{"type": "function", "function": {"name": ..., "arguments": {...}}}]')
        if role == "assistant" and not content.strip() and not calls:
            raise UserError(f"{where}, message {k}: the assistant's answer is empty; fill it in or delete the row")
    if not any(m["role"] == "assistant" for m in conv.messages):
        raise UserError(f"{where}: no assistant turn, so nothing to train on; end the conversation with the "
                        "assistant's answer")


def read_conversations(rows: list[dict], fmt: str, path: str,
                       mapping: dict | None = None) -> tuple[list[tuple[int, Conversation]], list[int]]:
    """(row number, checked conversation) for every usable row, and the 1-based numbers of the Alpaca rows left
    out because their instruction or output is empty (as harness.data.reading does)."""
    kept, left_out = [], []
    for number, row in enumerate(rows, start=1):
        if fmt == "alpaca" and not usable_alpaca(row, mapping):
            left_out.append(number)
            continue
        conv = to_conversation(row, fmt, mapping, path=path, row_number=number)
        check_conversation(conv, path, number)
        kept.append((number, conv))
    return kept, left_out
