"""The data people have, through a whole recipe run: each format trains offline, every assistant turn and nothing
else carries loss, and a file the recipes cannot train on is refused in one line before any model loads."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.data.examples import IGNORE_INDEX
from harness.locations import RECIPES_DIR
from harness.run.config import REPO_ROOT, DataArguments, ModelArguments

TURNS = [("Name a colour.", "Red."), ("Another one?", "Blue, like the sea."), ("And a third?", "Green.")]


def _messages(turns=TURNS, system: str | None = "Be brief."):
    out = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return out


ROWS = {
    "messages": [{"messages": _messages()} for _ in range(6)],
    "sharegpt": [{"conversations": [{"from": "system", "value": "Be brief."}]
                  + [x for u, a in TURNS for x in ({"from": "human", "value": u}, {"from": "gpt", "value": a})]}
                 for _ in range(6)],
    "prompt_completion": [{"prompt": f"Count to {n}:", "completion": " " + " ".join(map(str, range(1, n + 1)))}
                          for n in range(2, 8)],
    "conversational prompt_completion": [{"prompt": _messages(TURNS[:1])[:-1], "completion": [
        {"role": "assistant", "content": TURNS[0][1]}]} for _ in range(6)],
    "text": [{"text": f"Once upon a time there were {n} cats."} for n in range(6)],
    "alpaca with system and history": [{"instruction": "And a third?", "input": "", "output": "Green.",
                                        "system": "Be brief.", "history": [list(t) for t in TURNS[:2]]}
                                       for _ in range(6)],
}


def _write(tmp_path, name: str, rows: list[dict]):
    path = tmp_path / f"{name.replace(' ', '_')}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from harness.models.loading import load_tokenizer

    return load_tokenizer(ModelArguments(model="tiny-qwen2"))


def _trained_text(tokenizer, encoded) -> list[str]:
    """The runs of consecutive tokens that carry loss, decoded."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs + ([tokenizer.decode(current)] if current else [])


@pytest.mark.parametrize("kind", ["messages", "sharegpt", "alpaca with system and history"])
def test_every_assistant_turn_and_its_end_of_turn_carry_loss_and_nothing_else(tokenizer, tmp_path, kind):
    from harness.data.encoding import encode_rows

    args = DataArguments(data_file=str(_write(tmp_path, kind, ROWS[kind])), task="instruction",
                         prompt_format="chat_template", max_seq_length=256)
    encoded, counts = encode_rows(ROWS[kind][:1], args, tokenizer)
    # tiny-qwen2's EOS is <|endoftext|>, not ChatML's <|im_end|>: it closes the conversation, trained, as ever
    assert _trained_text(tokenizer, encoded[0]) == [f"{answer}<|im_end|>" for _, answer in TURNS] + ["<|endoftext|>"]
    assert counts["assistant_turns"] == 3


def test_a_long_conversation_keeps_its_whole_first_turns(tokenizer, tmp_path):
    from harness.data.encoding import encode_rows

    turns = [("Tell me more.", "More words here. " * 6)] * 6
    rows = [{"messages": _messages(turns)}]
    args = DataArguments(data_file="x.jsonl", task="instruction", max_seq_length=120)
    (encoded,), counts = encode_rows(rows, args, tokenizer)
    assert len(encoded.input_ids) <= 120 and encoded.body_cut
    trained = _trained_text(tokenizer, encoded)
    assert 1 <= len(trained) < 6 and all(t == f"{turns[0][1]}<|im_end|>" for t in trained[:-1])  # whole turns only
    assert counts["assistant_turns"] == len(trained)


def test_text_trains_every_token_and_prompt_completion_the_completion(tokenizer, tmp_path):
    from harness.data.encoding import encode_rows

    text_args = DataArguments(data_file="t.jsonl", task="instruction", max_seq_length=64)
    (text,), counts = encode_rows(ROWS["text"][:1], text_args, tokenizer)
    assert counts == {"format": "text"} and text.labels == text.input_ids
    assert text.input_ids[-1] == tokenizer.eos_token_id
    (pc,), _ = encode_rows(ROWS["prompt_completion"][:1], text_args, tokenizer)
    assert _trained_text(tokenizer, pc) == [" 1 2" + tokenizer.eos_token]


def _run(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(RECIPES_DIR / "qwen2_5_0_5b_lora.py"), "--model", "tiny-qwen2",
               "--output_dir", str(tmp_path / "run"), "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2",
               "--max_seq_length", "128", "--per_device_train_batch_size", "2", "--forgetting_samples", "0",
               "--validation_split", "0.34", "--disable_tqdm", "true", *extra]
    # datasets' cache (--dataset_name) goes to the test's folder, not the user's ~/.cache
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)


@pytest.mark.parametrize("kind", list(ROWS))
def test_each_format_trains_through_the_recipe(tmp_path, kind):
    path = _write(tmp_path, kind, ROWS[kind])
    done = _run(tmp_path, "--data_file", str(path), *(("--packing", "true") if kind == "text" else ()))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["global_step"] == 2
    assert record["data"]["format"] == kind.split(" ")[-1] if kind != "alpaca with system and history" \
        else record["data"]["format"] == "alpaca"
    if kind in ("messages", "sharegpt", "alpaca with system and history"):
        assert record["data"]["assistant_turns_trained"] == 3 * record["data"]["train_examples"]


def test_a_local_dataset_folder_by_dataset_name(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    _write(folder, "train", ROWS["sharegpt"])
    done = _run(tmp_path, "--dataset_name", str(folder))
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["data"]["data_file"] == str(folder) and record["data"]["format"] == "sharegpt"
    assert record["data"]["data_sha256"]  # a folder is hashed too: an edited file is another run


@pytest.mark.parametrize("rows,expected", [
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 1: no assistant turn"),
    ([{"messages": _messages()}, {"messages": [{"role": "wizard", "content": "x"}]}], "row 2, message 1: unknown role"),
    ([{"text": "x"}] * 2 + [{"prompt": "a", "completion": ""}], "row 3 mixes formats"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": " "}], "row 2: the completion is empty"),
    ([{"messages": _messages()}, {"prompt": "a", "completion": "b"}], "row 2 mixes formats"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
     "the assistant's answer is empty"),
    ([{"question": "a", "answer": "b"}], "fit no supervised format"),
])
def test_a_file_the_recipes_cannot_train_on_is_refused_before_loading(tmp_path, rows, expected):
    """Refused by the checks that need no model (in-process here; test_tool_calls_... runs one as a user would)."""
    from harness.errors import UserError
    from harness.run.command_line import parse_args
    from harness.run.flow import load_recipe, preflight

    path = _write(tmp_path, "bad", rows)
    cfg = parse_args({**load_recipe("qwen2_5_0_5b_lora").DEFAULTS, "recipe": "t"},
                     ["--model", "tiny-qwen2", "--data_file", str(path), "--output_dir", str(tmp_path / "run")])
    with pytest.raises(UserError, match=expected):
        preflight(cfg, output_dir=False)


def test_tool_calls_need_a_template_with_tools(tmp_path):
    """glaive's tool-calling conversations: tiny-qwen2's ChatML template has no tool support: one line, the first
    on stderr, no traceback, nothing written."""
    rows = json.loads((REPO_ROOT / "data" / "glaive_toolcall_en_demo.json").read_text())[:6]
    path = _write(tmp_path, "glaive", [r for r in rows])
    done = _run(tmp_path, "--data_file", str(path))
    assert done.returncode != 0 and "Traceback" not in done.stderr
    first = done.stderr.strip().splitlines()[0]
    assert first.startswith("qwen2_5_0_5b_lora: ") and "chat template has no tool support" in first
    assert not (tmp_path / "run" / "result.json").exists()
