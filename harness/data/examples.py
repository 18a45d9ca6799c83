"""Laying out prompts and tokenizing a prompt + answer example with the loss only on the answer (the Alpaca,
human/assistant and single-turn chat-template layouts; harness.data.chat does whole conversations).

Every example becomes prompt tokens followed by answer tokens; labels are -100 on the prompt
(and, after collation, on padding), so the model is trained only to produce the answer.
When an example is too long, the free text inside the prompt (a review, an instruction's
input) loses its end; the instruction and a classification label are never cut (an instruction's
answer that alone overflows the window keeps its beginning).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.data.reading import PROMPT_FORMATS, label_set
from harness.errors import UserError
from harness.run.config import DataArguments

IGNORE_INDEX = -100  # what torch's cross-entropy skips


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
    conversation (harness.data.chat) or text (harness.data.encoding)."""
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


class PromptTooLong(UserError):
    """An instruction whose prompt, its input cut away, still fills the window: harness.data.encoding leaves the row
    out and counts it, as it does a conversation whose first answer starts beyond the window."""


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
        body = without_last_tokens(tokenizer, body, overflow)
        cut = True
        prompt_ids = _ids(tokenizer, example.head + body + example.tail, True)  # merges at the seams can change
        overflow = len(prompt_ids) + len(target) - max_len
    if overflow > 0:
        # A label cut short would teach a wrong label; a long instruction answer (with or without an
        # input) is cut like any text, so one long record does not stop the whole run.
        if example.label is None and len(prompt_ids) >= max_len:
            raise PromptTooLong(f"an instruction's prompt alone needs {len(prompt_ids)} tokens, more than "
                                f"--max_seq_length {max_len}; raise it or shorten the instruction")
        if example.label is not None:
            raise UserError(
                f"--max_seq_length {max_len} is too short: the prompt without any text and the answer "
                f"need {len(prompt_ids) + len(target)} tokens; pass --max_seq_length {len(prompt_ids) + len(target)} or more"
            )
        target = target[: max_len - len(prompt_ids)]  # an instruction answer longer than the window
    return Encoded(prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target, len(prompt_ids), cut)


def without_last_tokens(tokenizer, body: str, count: int) -> str:
    """body without its last `count` tokens, cut where the first dropped token starts: always strictly shorter,
    so a loop that cuts until a text fits ends. Cutting where the last kept token ends is not: byte-level BPE splits
    one character (U+0085, an emoji) into several tokens that share its span, so dropping one of them can leave the
    text unchanged; nor is decoding the kept tokens (a split character decodes to U+FFFD, which can take more)."""
    if not getattr(tokenizer, "is_fast", False):  # a slow tokenizer has no offsets: the same share of characters
        total = len(_ids(tokenizer, body, False))
        keep = total - count
        return "" if keep <= 0 or not body else body[: min(len(body) * keep // total, len(body) - 1)]
    offsets = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    keep = len(offsets) - count
    if keep <= 0:
        return ""
    return body[: min(offsets[keep][0], len(body) - 1)]
