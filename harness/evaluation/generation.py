"""Answering prompts with a trained model over a grid of decoding settings, and ROUGE-L.

The grid is temperature x top_p (default 0.7/1.0/1.3 x 0.8/0.9/0.95): every setting answers the
same prompts with sampling from the same seed, so the settings differ only in how they decode.
Prompts are laid out exactly as in training (harness.data.reading), so the model sees what it learned.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.data.examples import build_examples
from harness.data.reading import read_table
from harness.errors import UserError
from harness.evaluation.progress import bar
from harness.run.config import DataArguments, _help, find_file


@dataclass
class DecodingArguments:
    temperatures: str = field(default="0.7,1.0,1.3", metadata=_help("Comma-separated sampling temperatures of the grid."))
    top_ps: str = field(default="0.8,0.9,0.95", metadata=_help("Comma-separated nucleus (top_p) values of the grid."))
    max_new_tokens: int = field(default=512, metadata=_help("Longest answer generated, in tokens."))
    test_file: str = field(
        default="data/WizardLM_testset.jsonl",
        metadata=_help("Test prompts: JSON/JSONL with Instruction (or instruction), optionally Skill and Difficulty."),
    )
    max_test_prompts: int | None = field(
        default=None,
        metadata=_help("Use N test prompts, evenly spaced over the file (it is ordered by skill). Unset: all."),
    )
    generation_batch_size: int = field(default=8, metadata=_help("Prompts answered together."))


@dataclass(frozen=True)
class DecodingSetting:
    temperature: float
    top_p: float

    @property
    def label(self) -> str:
        return f"T={self.temperature:g}, top_p={self.top_p:g}"


def decoding_grid(args: DecodingArguments) -> list[DecodingSetting]:
    def numbers(text: str, name: str) -> list[float]:
        try:
            values = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--{name} {text!r}: give comma-separated numbers, e.g. 0.7,1.0,1.3") from None
        if not values:
            raise UserError(f"--{name} is empty; give at least one value")
        return values

    temperatures, top_ps = numbers(args.temperatures, "temperatures"), numbers(args.top_ps, "top_ps")
    if any(not (math.isfinite(t) and t > 0) for t in temperatures):  # float() reads "nan" and "inf" too
        raise UserError(f"--temperatures {args.temperatures}: every temperature must be a finite number > 0 (sampling)")
    if any(not 0 < p <= 1 for p in top_ps):  # nan fails every comparison: refused too
        raise UserError(f"--top_ps {args.top_ps}: every top_p must be in (0, 1]")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {args.max_new_tokens}")
    return [DecodingSetting(t, p) for t, p in itertools.product(temperatures, top_ps)]


# ---------------------------------------------------------------------------- test prompts

@dataclass
class TestPrompt:
    idx: Any
    instruction: str
    skill: str
    difficulty: int | None


def load_test_prompts(path: str, limit: int | None) -> list[TestPrompt]:
    if find_file(path) is None:
        raise UserError(f"test file {path} not found; pass --test_file (e.g. data/WizardLM_testset.jsonl)")
    rows = read_table(path, "--test_file")
    key = next((k for k in ("Instruction", "instruction") if k in rows[0]), None)
    if key is None:
        raise UserError(f"test file {path} needs an Instruction (or instruction) field; it has {', '.join(map(repr, rows[0]))}")
    prompts = []
    for number, row in enumerate(rows, start=1):
        text = str(row.get(key) or "").strip()
        if not text:
            continue
        difficulty = row.get("Difficulty", row.get("difficulty"))
        try:
            difficulty = int(difficulty) if difficulty is not None else None
        except (TypeError, ValueError):
            raise UserError(f"test file {path}, row {number}: Difficulty {difficulty!r} is not a whole number") from None
        prompts.append(TestPrompt(row.get("idx", number), text, str(row.get("Skill", row.get("skill", "unknown"))), difficulty))
    if limit is not None:
        if limit < 1:
            raise UserError(f"--max_test_prompts must be at least 1, got {limit}")
        if limit < len(prompts):
            step = len(prompts) / limit
            prompts = [prompts[int(i * step)] for i in range(limit)]
    return prompts


# ---------------------------------------------------------------------------- generating

def instruction_prompt(tokenizer, data_args: DataArguments, instruction: str, given_input: str = "") -> str:
    """The prompt text training used for this instruction (same layout, same template)."""
    row = {"instruction": instruction, "input": given_input, "output": ""}
    return build_examples([row], data_args, tokenizer)[0].prompt


def fit_prompt(tokenizer, prompt_for, instruction: str, given_input: str, max_prompt_tokens: int) -> tuple[str, bool]:
    """prompt_for(instruction, input) as text, cut to max_prompt_tokens: first the input loses its
    last words, then (with no input left) the instruction. Returns the prompt and whether it was cut."""
    def fits(text: str) -> bool:
        return len(tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]) <= max_prompt_tokens

    def longest_prefix(words: list[str], build) -> str | None:
        low, high = -1, len(words)  # binary search: the most words whose prompt fits (-1: none does)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if fits(build(" ".join(words[:mid]))) else (low, mid - 1)
        return None if low < 0 else " ".join(words[:low])

    prompt = prompt_for(instruction, given_input)
    if fits(prompt):
        return prompt, False
    kept_input = longest_prefix(given_input.split(), lambda cut: prompt_for(instruction, cut))
    if kept_input is not None:
        return prompt_for(instruction, kept_input), True
    kept_instruction = longest_prefix(instruction.split(), lambda cut: prompt_for(cut, ""))
    if kept_instruction:
        return prompt_for(kept_instruction, ""), True
    raise UserError(
        f"the prompt layout alone needs more than {max_prompt_tokens} tokens; raise --max_seq_length "
        "or lower --max_new_tokens"
    )


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], setting: DecodingSetting | None, max_new_tokens: int,
             seed: int, batch_size: int, stop_strings: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Sampled answers (greedy ones when setting is None), one per prompt, reproducible for a given seed and
    batch size. An answer ends at the end-of-sequence token or where it starts one of stop_strings (e.g. the
    next turn of a text layout, which a base model happily writes itself)."""
    from transformers import set_seed

    if not prompts:
        return []
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    set_seed(seed)
    device = next(model.parameters()).device
    try:
        with bar(len(prompts), "Generating", unit="answer") as progress:
            answers = _generate_batches(model, tokenizer, prompts, setting, max_new_tokens, batch_size, stop_strings,
                                        device, progress)
    finally:
        model.train(was_training)
        tokenizer.padding_side = side
    return answers


def _generate_batches(model, tokenizer, prompts, setting, max_new_tokens, batch_size, stop_strings, device,
                      progress) -> list[str]:
    """generate()'s loop, a batch at a time, each counted on the progress bar."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=True).to(device)
        out = model.generate(
            **batch,
            **(dict(do_sample=True, temperature=setting.temperature, top_p=setting.top_p,
                    top_k=0)  # nucleus sampling alone, as the grid says (transformers' default adds top_k 50)
               if setting is not None else dict(do_sample=False, temperature=None, top_p=None, top_k=None)),
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **({"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}),
        )
        new = out[:, batch["input_ids"].shape[1]:]
        for text in tokenizer.batch_decode(new, skip_special_tokens=True):
            for stop in stop_strings:
                text = text.split(stop)[0]
            answers.append(text.strip())
        progress.update(len(new))
    return answers


# ---------------------------------------------------------------------------- ROUGE-L

def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased words: the longest common subsequence against both lengths."""
    a, b = candidate.lower().split(), reference.lower().split()
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for word in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if word == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def dump_jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
