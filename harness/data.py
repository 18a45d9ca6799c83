"""Reading data files, laying out prompts, and tokenizing a prompt + answer example with the loss only on the answer
(harness.encoding turns a run's rows of every format into the datasets it trains on).

Every example becomes prompt tokens followed by answer tokens; labels are -100 on the prompt
(and, after collation, on padding), so the model is trained only to produce the answer.
When an example is too long, the free text inside the prompt (a review, an instruction's
input) loses its end; the instruction and a classification label are never cut (an instruction's
answer that alone overflows the window keeps its beginning).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import DataArguments, find_file
from harness.errors import UserError

IGNORE_INDEX = -100  # what torch's cross-entropy skips
PROMPT_FORMATS = ("human_assistant", "chat_template", "alpaca", "auto")

# Stanford Alpaca's prompt, for base models without a chat template. With an input, the input
# is the part that may be cut to fit.
ALPACA_HEAD = (
    "Below is an instruction that describes a task{context}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
)
ALPACA_CONTEXT = ", paired with an input that provides further context"
ALPACA_INPUT = "### Input:\n"
ALPACA_RESPONSE = "### Response:\n"


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
            from harness.formats import read_parquet

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
class Example:
    """One example before tokenization: head + body + tail is the prompt, body may be cut."""

    head: str
    body: str
    tail: str
    answer: str
    label: int | None = None  # index into the label set, classification only
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.head + self.body + self.tail


@dataclass
class RecordFile:
    """The usable records of one data file, and the rows left out because they have no text."""

    path: str
    rows: list[dict[str, Any]]
    total: int  # rows read (after --max_samples)
    left_out: list[int] = field(default_factory=list)  # 1-based row numbers
    reason: str = ""

    def summary(self) -> str:
        shown = ", ".join(map(str, self.left_out[:20])) + (", ..." if len(self.left_out) > 20 else "")
        return (f"left out {len(self.left_out)} of {self.total} rows of {self.path} with {self.reason} "
                f"({'rows' if len(self.left_out) > 1 else 'row'} {shown}); they are neither trained on nor evaluated")

    def report(self) -> dict[str, Any]:
        """For result.json: how many rows were left out and which (the first 100)."""
        return {"count": len(self.left_out), "rows": self.left_out[:100], "reason": self.reason or None}


def data_source(args: DataArguments) -> str:
    """What the run's training data is read from: --dataset_name when given, else --data_file."""
    return args.dataset_name or args.data_file


def load_records(args: DataArguments, option: str = "--data_file") -> RecordFile:
    """The rows the run will use, checked against the task's needs, in file order."""
    if option == "--data_file" and args.dataset_name:
        from harness.formats import load_hub_rows

        rows = load_hub_rows(args.dataset_name, args.dataset_config, args.dataset_split)
        args = dataclasses.replace(args, data_file=args.dataset_name)  # named so in every message and count
    else:
        rows = read_table(args.data_file, option)
    if args.max_samples is not None:  # >= 1: harness.checks
        rows = rows[: args.max_samples]
    if args.task == "classification":
        kept, reason = _check_classification_rows(rows, args)
    elif args.task == "instruction":
        kept, reason = _check_instruction_rows(rows, args)
    elif args.task in ("preference", "math"):  # DPO's pairs, GRPO's problems: a bad row is refused, not left out
        from harness.objectives import gsm8k, preference

        checked = (preference if args.task == "preference" else gsm8k).checked_rows(rows, args.data_file)
        return RecordFile(args.data_file, checked, len(rows))
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
    """Supervised rows in one of harness.formats' formats: a conversation a chat template cannot train on is refused
    naming its row; Alpaca rows without instruction or output, and text rows without text, are left out and counted."""
    from harness import formats

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
    """The supervised format of the rows (harness.formats.FORMATS), from their columns or --column_mapping."""
    from harness.formats import detect_format

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
    and every row trains. validation_split is in [0, 1) (harness.checks)."""
    if args.eval_file:
        return rows, (eval_records or load_eval_records(args)).rows
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
    return [rows[i] for i in split["train"]["i"]], [rows[i] for i in split["test"]["i"]]


# ---------------------------------------------------------------------------- prompt layout

def prompt_layout(args: DataArguments, tokenizer) -> str:
    """The layout prompts really get: chat_template, alpaca or human_assistant."""
    if args.prompt_format not in PROMPT_FORMATS:
        raise UserError(f"unknown --prompt_format {args.prompt_format!r}; use {', '.join(PROMPT_FORMATS)}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.prompt_format == "auto":
        return "chat_template" if has_template else "alpaca"
    if args.task == "instruction" and args.prompt_format != "alpaca":
        # Instructions have always been Alpaca text unless a chat template is asked for and exists.
        return "chat_template" if args.prompt_format == "chat_template" and has_template else "alpaca"
    return args.prompt_format


# Text layouts have no end-of-turn token: generation stops where the model starts the next turn itself.
_LAYOUT_STOP_STRINGS = {"alpaca": ["### Instruction:"], "human_assistant": ["\nHuman:"]}


def stop_strings(args: DataArguments, tokenizer) -> list[str]:
    """Where a generated answer ends in this run's prompt layout (chat templates end turns with EOS)."""
    return list(_LAYOUT_STOP_STRINGS.get(prompt_layout(args, tokenizer), []))


def build_examples(rows: list[dict], args: DataArguments, tokenizer) -> list[Example]:
    if args.task == "classification":
        labels = label_set(args)
        return [_classification_example(row, args, labels, tokenizer) for row in rows]
    return [_instruction_example(row, args, tokenizer) for row in rows]


def _classification_example(row: dict, args: DataArguments, labels: list[str], tokenizer) -> Example:
    label = str(row[args.label_column]).strip()
    text = str(row[args.text_column])
    layout = prompt_layout(args, tokenizer)
    if layout == "human_assistant":
        # The original Kaggle script's layout; the answer's leading space belongs to the answer so
        # that the prompt's tokens are a prefix of the whole example's tokens.
        candidates = [f" {option}" for option in labels]
        return Example(f"Human: {args.instruction}\n", text, "\nAssistant:", f" {label}", labels.index(label),
                       {"candidates": candidates})
    if layout == "chat_template":
        def user_turn(body: str) -> list[dict]:
            return [{"role": "user", "content": f"{args.instruction}\n{body}"}]

        head, tail = _chat_prompt_around(tokenizer, user_turn)
        prompt = head + text + tail
        candidates = [_chat_answer(tokenizer, prompt, option, user_turn(text)) for option in labels]
        return Example(head, text, tail, candidates[labels.index(label)], labels.index(label),
                       {"candidates": candidates})
    # Alpaca: the instruction, the text as its input, the label as the response.
    head = ALPACA_HEAD.format(context=ALPACA_CONTEXT, instruction=args.instruction) + ALPACA_INPUT
    return Example(head, text, "\n\n" + ALPACA_RESPONSE, label, labels.index(label), {"candidates": list(labels)})


def _instruction_example(row: dict, args: DataArguments, tokenizer) -> Example:
    """A single-turn Alpaca row (no system, no history) as prompt + answer; every other supervised row is a
    conversation (harness.chat) or text (harness.encoding)."""
    instruction = str(row["instruction"]).strip()
    given = str(row.get("input") or "").strip()
    output = str(row["output"]).strip()
    if prompt_layout(args, tokenizer) == "chat_template":
        def user_turn(body: str) -> list[dict]:
            return [{"role": "user", "content": f"{instruction}\n\n{body}" if body else instruction}]

        if given:
            head, tail = _chat_prompt_around(tokenizer, user_turn)
        else:
            head, tail = _render_chat(tokenizer, user_turn(""), add_generation_prompt=True), ""
        return Example(head, given, tail, _chat_answer(tokenizer, head + given + tail, output, user_turn(given)))
    # Plain Alpaca layout: for base models without a chat template.
    if given:
        head = ALPACA_HEAD.format(context=ALPACA_CONTEXT, instruction=instruction) + ALPACA_INPUT
        return Example(head, given, "\n\n" + ALPACA_RESPONSE, output)
    return Example(ALPACA_HEAD.format(context="", instruction=instruction) + ALPACA_RESPONSE, "", "", output)


def generation_prompt(messages: list[dict], args: DataArguments, tokenizer) -> str:
    """The prompt for the model's next turn after `messages`, laid out as training laid out its prompts.

    Classification takes the last message as the text to classify. With a chat template the whole
    conversation is rendered; the text layouts (single-turn by design) repeat their layout per turn.
    """
    turns = [m for m in messages if m["role"] != "system"]
    if args.task == "classification":
        row = {args.text_column: turns[-1]["content"], args.label_column: label_set(args)[0]}
        return build_examples([row], args, tokenizer)[0].prompt
    if prompt_layout(args, tokenizer) == "chat_template":
        return _render_chat(tokenizer, messages, add_generation_prompt=True)
    parts = []
    for user, assistant in zip(turns[:-1:2], turns[1::2]):
        done = _instruction_example({"instruction": user["content"], "output": assistant["content"]}, args, tokenizer)
        parts.append(done.prompt + done.answer + "\n\n")
    parts.append(_instruction_example({"instruction": turns[-1]["content"], "output": "-"}, args, tokenizer).prompt)
    return "".join(parts)


_BODY_MARK = "\u2063BODY\u2063"  # invisible separator: never appears in real data


def _render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "this tokenizer has no chat template; use --prompt_format auto, alpaca or human_assistant "
            "(classification), or data without 'messages'"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _chat_prompt_around(tokenizer, make_messages) -> tuple[str, str]:
    """The chat-template text before and after the user's free text, so that text can be cut alone."""
    rendered = _render_chat(tokenizer, make_messages(_BODY_MARK), add_generation_prompt=True)
    head, _, tail = rendered.partition(_BODY_MARK)
    return head, tail


def _chat_answer(tokenizer, prompt: str, answer: str, history: list[dict] | None = None) -> str:
    """The answer as the chat template writes it after the prompt (end-of-turn tokens included)."""
    if history is None:
        return answer
    full = _render_chat(tokenizer, history + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    return full[len(prompt):] if full.startswith(prompt) else answer


# ---------------------------------------------------------------------------- tokenization

@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    body_cut: bool


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    # verbose=False: a long review is tokenized whole before it is cut; the length warning is noise
    return tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"]


def answer_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Tokens of `answer` as they come out when tokenized after `prompt` (merges across the seam)."""
    prompt_ids = _ids(tokenizer, prompt, True)
    full_ids = _ids(tokenizer, prompt + answer, True)
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids):]
    return _ids(tokenizer, answer, False)


def encode(tokenizer, example: Example, max_len: int, add_eos: bool = True) -> Encoded:
    """Prompt + answer tokens, labels masked on the prompt, the body cut to fit max_len."""
    prompt_ids = _ids(tokenizer, example.prompt, True)
    target = answer_ids(tokenizer, example.prompt, example.answer)
    if add_eos and tokenizer.eos_token_id is not None and (not target or target[-1] != tokenizer.eos_token_id):
        target = target + [tokenizer.eos_token_id]
    body, cut = example.body, False
    overflow = len(prompt_ids) + len(target) - max_len
    # Every pass leaves the body strictly shorter, so there are at most len(body) passes (in practice one or two).
    for _ in range(len(body)):
        if overflow <= 0 or not body:
            break
        body = _cut_tokens(tokenizer, body, overflow)
        cut = True
        prompt_ids = _ids(tokenizer, example.head + body + example.tail, True)  # merges at the seams can change
        overflow = len(prompt_ids) + len(target) - max_len
    if overflow > 0:
        # A label cut short would teach a wrong label; a long instruction answer (with or without an
        # input) is cut like any text, so one long record does not stop the whole run.
        if example.label is not None or len(prompt_ids) >= max_len:
            raise UserError(
                f"--max_seq_length {max_len} is too short: the prompt without any text and the answer "
                f"need {len(prompt_ids) + len(target)} tokens; pass --max_seq_length {len(prompt_ids) + len(target)} or more"
            )
        target = target[: max_len - len(prompt_ids)]  # an instruction answer longer than the window
    return Encoded(prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target, len(prompt_ids), cut)


def _cut_tokens(tokenizer, body: str, count: int) -> str:
    """body without its last `count` tokens, cut where the first dropped token starts: always strictly shorter.
    Cutting where the last kept token ends is not: byte-level BPE splits one character (U+0085, an emoji) into
    several tokens that share its span, so dropping one of them can leave the text unchanged."""
    offsets = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    keep = len(offsets) - count
    if keep <= 0:
        return ""
    return body[: min(offsets[keep][0], len(body) - 1)]


def data_identity(path: str) -> dict[str, Any]:
    """Name and content hash (sha256, None when there is no such file) of a data file, or of a local dataset folder
    (its files' names and hashes, hidden ones and datasets' caches aside), for result.json provenance and a run's
    fingerprint (harness.rundir). A Hub dataset id has none: it is named, not hashed."""
    import hashlib

    from harness import file_sha256

    found = find_file(path) if path else None
    if found is not None and found.is_dir():
        files = sorted(f for f in found.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(found).parts))[:100_000]
        listing = "".join(f"{f.relative_to(found).as_posix()}\t{file_sha256(f)}\n" for f in files)
        return {"data_file": path, "data_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if found is None or not found.is_file():
        return {"data_file": path, "data_sha256": None}
    return {"data_file": path, "data_sha256": file_sha256(found)}
