"""A supervised run's rows, in any format, to the tokenized datasets it trains and evaluates on.

Each example becomes input_ids and a completion mask (1 on the tokens that carry loss), TRL's own columns for
tokenized data: SFTTrainer builds the labels from them, then pads, flattens or packs. By format:
  classification        prompt + label (harness.data.examples): the review is cut to fit, never the label
  alpaca (one turn)     prompt + answer in the run's layout (harness.data.examples): the input is cut, never the instruction
  conversations         every assistant turn trained, end-of-turn token included (harness.data.chat): sharegpt,
                        messages, conversational prompt/completion, Alpaca rows with system or history
  prompt / completion   plain text: the prompt cut to fit, the loss on the completion
  text                  continued pre-training: the loss on every token, the text's end cut to fit
A conversation whose first answer starts beyond the window is left out and counted.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from harness.data import chat, formats
from harness.data.examples import (
    IGNORE_INDEX,
    Encoded,
    Example,
    PromptTooLong,
    _instruction_example,
    build_examples,
    encode,
    prompt_layout,
)
from harness.data.reading import column_mapping, sft_format
from harness.errors import UserError
from harness.models.llama2c import ALPACA_CHAT_TEMPLATE
from harness.run.config import DataArguments

CONVERSATIONS = ("sharegpt", "messages")


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset with input_ids and completion_mask (1: the token carries loss)
    eval: Any | None
    eval_examples: list[Example]  # classification only: what the task scorer scores
    eval_prompts: list[list[int]]  # truncated prompt ids of eval examples, for task scoring
    eval_answers: list[list[int]]  # the tokens after each eval prompt: those the eval loss is taken on
    stats: dict[str, Any]


def prepare(rows_train: list[dict], rows_eval: list[dict], args: DataArguments, tokenizer) -> PreparedData:
    from datasets import Dataset

    def to_dataset(encoded: list[Encoded]):
        return Dataset.from_dict({
            "input_ids": [e.input_ids for e in encoded],
            "completion_mask": [[int(t != IGNORE_INDEX) for t in e.labels] for e in encoded],
        })

    train_enc, counts = encode_rows(rows_train, args, tokenizer)
    # --eval_max_samples caps the eval loss's examples as well as the task metrics' (as DPO and GRPO cap theirs): a
    # short run does not spend its time scoring thousands of rows
    rows_eval = rows_eval[: args.eval_max_samples] if args.eval_max_samples else rows_eval
    if not train_enc:
        raise UserError(f"no training example fits --max_seq_length {args.max_seq_length}: every one's prompt (a "
                        "conversation's, up to its first answer) fills it; raise --max_seq_length")
    # Classification keeps its eval examples: the task scorer scores their label candidates
    eval_examples = build_examples(rows_eval, args, tokenizer) if rows_eval and args.task == "classification" else []
    if eval_examples:
        eval_enc, eval_counts = [encode(tokenizer, ex, args.max_seq_length) for ex in eval_examples], {}
    else:
        eval_enc, eval_counts = encode_rows(rows_eval, args, tokenizer) if rows_eval else ([], {})
    lengths = [len(e.input_ids) for e in train_enc]
    stats = {
        **({"format": counts["format"]} if "format" in counts else {}),
        "train_examples": len(train_enc),
        "eval_examples": len(eval_enc),
        "train_tokens_per_epoch": sum(lengths),
        "train_answer_tokens_per_epoch": sum(sum(1 for t in e.labels if t != IGNORE_INDEX) for e in train_enc),
        "max_example_tokens": max(lengths),
        "mean_example_tokens": round(sum(lengths) / len(lengths), 1),
        "examples_cut_to_fit": sum(e.body_cut for e in train_enc + eval_enc),
        **({"assistant_turns_trained": counts["assistant_turns"]} if "assistant_turns" in counts else {}),
        **({"examples_left_out_too_long": counts.get("too_long", 0) + eval_counts.get("too_long", 0)}
           if "too_long" in counts or "too_long" in eval_counts else {}),
    }
    eval_prompts = [e.input_ids[: e.prompt_len] for e in eval_enc]
    eval_answers = [e.input_ids[e.prompt_len:] for e in eval_enc]
    return PreparedData(to_dataset(train_enc), to_dataset(eval_enc) if eval_enc else None, eval_examples,
                        eval_prompts, eval_answers, stats)


def encode_rows(rows: list[dict], args: DataArguments, tokenizer) -> tuple[list[Encoded], dict[str, Any]]:
    """The rows' examples, tokenized and cut to --max_seq_length, and what happened to them (format, assistant
    turns trained, rows left out as too long: a conversation whose first answer, an instruction whose prompt, starts
    beyond the window)."""
    window = args.max_seq_length
    if args.task == "classification":
        return [encode(tokenizer, ex, window) for ex in build_examples(rows, args, tokenizer)], {}
    fmt, mapping = sft_format(rows, args), column_mapping(args)
    encoded: list[Encoded] = []
    counts = {"format": fmt, "assistant_turns": 0, "too_long": 0}
    template = None  # the tokenizer conversations are rendered with, chosen at the first one
    for number, row in enumerate(rows, start=1):
        if fmt == "text":
            encoded.append(_encode_text(tokenizer, str(row["text"]), window))
        elif fmt == "prompt_completion" and not formats.is_conversational(row) or (
                fmt == "alpaca" and mapping is None and not row.get("system") and not row.get("history")):
            # TRL's plain prompt/completion (no template; the prompt is the text cut to fit), or one Alpaca turn
            example = (_instruction_example(row, args, tokenizer) if fmt == "alpaca"
                       else Example("", str(row["prompt"]), "", str(row["completion"])))
            try:
                encoded.append(encode(tokenizer, example, window))
            except PromptTooLong:
                counts["too_long"] += 1
        else:
            template = template or _conversation_tokenizer(tokenizer, args, fmt)
            conv = formats.to_conversation(row, fmt, mapping, path=args.data_file, row_number=number)
            done = chat.encode_conversation(template, conv, window, where=f"data file {args.data_file}, row {number}")
            if done is None:
                counts["too_long"] += 1
                continue
            counts["assistant_turns"] += done.assistant_turns
            labels = [t if m else IGNORE_INDEX for t, m in zip(done.input_ids, done.completion_mask)]
            first = next((i for i, m in enumerate(done.completion_mask) if m), len(labels))
            encoded.append(Encoded(done.input_ids, labels, first, done.turns_cut))
    if fmt not in CONVERSATIONS:  # counts of what these formats may not have had: said only when there was some
        counts = {key: value for key, value in counts.items() if key == "format" or value}
    return encoded, counts


def _encode_text(tokenizer, text: str, window: int) -> Encoded:
    """Continued pre-training: every token carries loss, EOS closes the text, its end is cut to fit."""
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids = ids + [tokenizer.eos_token_id]
    cut = len(ids) > window
    ids = ids[:window]
    return Encoded(ids, list(ids), 0, cut)


def _conversation_tokenizer(tokenizer, args: DataArguments, fmt: str):
    """The tokenizer whose chat template renders this run's conversations: its own (conversation formats, or the
    chat_template layout), else the Alpaca layout as a template (a base model without one, or --prompt_format
    alpaca), so a multi-turn conversation trains every answer there too."""
    own = bool(getattr(tokenizer, "chat_template", None))
    wants_own = prompt_layout(args, tokenizer) == "chat_template" or (fmt != "alpaca" and args.prompt_format != "alpaca")
    if own and wants_own:
        return tokenizer
    alpaca = copy.copy(tokenizer)  # shares the vocabulary; only the template differs
    alpaca.chat_template = ALPACA_CHAT_TEMPLATE
    print("Data: conversations are laid out in the Alpaca layout (### Instruction / ### Response)"
          + ("" if own else ": this tokenizer has no chat template; --chat_template_path FILE.jinja gives it one"))
    return alpaca
