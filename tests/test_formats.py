"""Data formats for supervised fine-tuning: detected from the columns, read as conversations, bad rows named."""
from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.data.formats import (
    FORMATS,
    Conversation,
    check_conversation,
    detect_format,
    is_conversational,
    load_hub_rows,
    read_conversations,
    read_parquet,
    to_conversation,
    usable_alpaca,
)
from harness.data.reading import load_records, read_table
from harness.errors import UserError
from harness.locations import REPO_ROOT
from harness.run.config import DataArguments

DATASET_INFO = json.loads((REPO_ROOT / "data" / "llamafactory_dataset_info.json").read_text(encoding="utf-8"))


def refused(call, *args, **kwargs) -> str:
    """The UserError's message, checked to be one line."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def conversation_of(row: dict, fmt: str | None = None, mapping: dict | None = None) -> Conversation:
    fmt = fmt or detect_format([row], "t.json", mapping)
    conv = to_conversation(row, fmt, mapping, path="t.json", row_number=1)
    check_conversation(conv, "t.json", 1)
    return conv


# ---------------------------------------------------------------------------- the real files in data/

def test_real_files_are_detected():
    assert detect_format(read_table("data/alpaca_en_demo.json"), "data/alpaca_en_demo.json") == "alpaca"
    assert detect_format(read_table("data/alpaca_tiny.json"), "data/alpaca_tiny.json") == "alpaca"  # has "text" too
    assert detect_format(read_table("data/glaive_toolcall_en_demo.json"), "glaive") == "sharegpt"
    assert detect_format(read_table("data/c4_demo.jsonl"), "data/c4_demo.jsonl") == "text"
    assert set(FORMATS) == {"alpaca", "sharegpt", "messages", "prompt_completion", "text"}


def test_preference_pairs_are_not_sft_data():
    message = refused(detect_format, read_table("data/dpo_en_demo.json"), "data/dpo_en_demo.json")
    assert "data/dpo_en_demo.json" in message and "chosen/rejected" in message and "--task preference" in message


def test_alpaca_demo_reads_as_one_turn_conversations():
    rows = read_table("data/alpaca_en_demo.json")
    kept, left_out = read_conversations(rows, "alpaca", "data/alpaca_en_demo.json")
    assert len(kept) == 999 and left_out == []
    with_input = next(row for row in rows if row["input"].strip())
    messages = conversation_of(with_input).messages
    assert messages == [
        {"role": "user", "content": with_input["instruction"].strip() + "\n\n" + with_input["input"].strip()},
        {"role": "assistant", "content": with_input["output"].strip()},
    ]


@pytest.mark.parametrize("mapping", [None, DATASET_INFO["glaive_toolcall_en_demo"]])
def test_glaive_tool_calls_and_observations(mapping):
    rows = read_table("data/glaive_toolcall_en_demo.json")
    assert detect_format(rows, "glaive", mapping) == "sharegpt"
    kept, left_out = read_conversations(rows, "sharegpt", "glaive", mapping)
    assert len(kept) == 300 and left_out == []
    messages = [m for _, conv in kept for m in conv.messages]
    calls = [m for m in messages if m.get("tool_calls")]
    assert len(calls) == 211 and all(m["role"] == "assistant" and m["content"] == "" for m in calls)
    assert sum(m["role"] == "tool" for m in messages) == 211
    assert sum(m["role"] == "assistant" and not m.get("tool_calls") for m in messages) == 746
    assert sum(conv.tools is not None for _, conv in kept) == 191  # the others' "[]" is no tools
    assert sum(any(m.get("tool_calls") for m in conv.messages) for _, conv in kept) == 153
    first = kept[0][1]
    assert first.messages[3]["tool_calls"] == [{"type": "function", "function": {
        "name": "search_recipes", "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}}]
    assert first.tools[0]["type"] == "function" and first.tools[0]["function"]["name"] == "search_recipes"


def test_usable_alpaca_leaves_out_what_harness_data_leaves_out(tmp_path):
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": " ", "input": "x", "output": "y"},
            {"instruction": "a", "output": None}, {"instruction": "b", "input": None, "output": "c"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    today = load_records(DataArguments(task="instruction", data_file=str(path)))
    kept, left_out = read_conversations(rows, detect_format(rows, str(path)), str(path))
    assert left_out == today.left_out == [2, 3]
    assert [usable_alpaca(row) for row in rows] == [True, False, False, True]
    assert [number for number, _ in kept] == [1, 4]


# ---------------------------------------------------------------------------- hand-written rows

def test_alpaca_system_and_history():
    row = {"instruction": "And now?", "input": "", "output": "Done.", "system": "Be brief.",
           "history": [["First?", "One."], ["Second?", "Two."]]}
    assert [(m["role"], m["content"]) for m in conversation_of(row).messages] == [
        ("system", "Be brief."), ("user", "First?"), ("assistant", "One."), ("user", "Second?"),
        ("assistant", "Two."), ("user", "And now?"), ("assistant", "Done.")]
    message = refused(conversation_of, {**row, "history": [["only one"]]})
    assert "t.json, row 1" in message and "history entry 1" in message


def test_messages_with_tool_calls_as_openai_writes_them():
    row = {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "assistant", "content": "18C and sunny."}],
        "tools": [{"name": "weather", "parameters": {"type": "object"}}]}
    before = copy.deepcopy(row)
    conv = conversation_of(row)
    assert row == before  # the row itself is left as it was
    assert conv.messages[1]["content"] == ""
    assert conv.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert conv.tools == [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert conversation_of({**row, "tools": "[]"}).tools is None


def test_prompt_completion_plain_and_conversational():
    plain = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "3+3=", "completion": "6"}]
    assert detect_format(plain, "p.jsonl") == "prompt_completion" and not is_conversational(plain[0])
    chat = {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
    assert is_conversational(chat)
    assert [m["role"] for m in conversation_of(chat).messages] == ["user", "assistant"]
    message = refused(detect_format, [chat, plain[0]], "p.jsonl")
    assert "row 2" in message and "mixes formats" in message
    message = refused(detect_format, [{"prompt": "x", "completion": chat["completion"]}], "p.jsonl")
    assert "row 1" in message and "both be text or both be lists" in message
    with pytest.raises(ValueError):  # plain text is the caller's to tokenize as it is
        to_conversation(plain[0], "prompt_completion")


def test_text_rows_may_carry_other_columns():
    assert detect_format([{"text": "a", "url": "u", "timestamp": "t"}], "c4.jsonl") == "text"


def test_no_format_lists_columns_and_formats():
    message = refused(detect_format, [{"question": "q", "answer": "a"}], "gsm.jsonl")
    assert "gsm.jsonl" in message and "'question', 'answer'" in message
    for name in FORMATS:
        assert name in message
    assert "instruction + output" in message and "conversations: [{from, value}]" in message


def test_mixed_formats_name_the_row_and_both_formats():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    message = refused(detect_format, rows, "mixed.jsonl")
    assert "mixed.jsonl, row 3" in message and "mixes formats" in message
    assert "are messages, row 1's are alpaca" in message


def msgs(*turns: tuple, **columns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns], **columns}


def sgpt(*turns: tuple, **columns) -> dict:
    return {"conversations": [{"from": who, "value": value} for who, value in turns], **columns}


BAD_CALL = {"role": "assistant", "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}


@pytest.mark.parametrize("row, fmt, expected", [
    (msgs(("user", "x"), ("bot", "y")), "messages", "unknown role 'bot'"),
    (sgpt(("human", "x"), ("robot", "y")), "sharegpt", "unknown from 'robot'"),
    (msgs(("system", "s"), ("user", "x")), "messages", "no assistant turn"),
    (sgpt(("human", "x"), ("gpt", "  ")), "sharegpt", "answer is empty"),
    (msgs(("user", [{"type": "image"}]), ("assistant", "y")), "messages", "content is a list, not text"),
    (sgpt(("human", "x"), ("function_call", "{name: f}")), "sharegpt", "function_call is not valid JSON"),
    (sgpt(("human", "x"), ("function_call", '{"arguments": {}}')), "sharegpt", "function_call must be"),
    ({"messages": [{"role": "user", "content": "x"}, BAD_CALL]}, "messages", "arguments are not valid JSON"),
    ({"conversations": [{"role": "user", "content": "x"}]}, "sharegpt", "expected a {from, value} object"),
    (sgpt(("human", "x"), ("gpt", "y"), tools="[{"), "sharegpt", "tools column is not valid JSON"),
])
def test_bad_rows_are_refused_naming_the_row(row, fmt, expected):
    good = msgs(("user", "ok"), ("assistant", "ok")) if fmt == "messages" else sgpt(("human", "ok"), ("gpt", "ok"))
    message = refused(read_conversations, [good, row], fmt, "bad.json")
    assert "bad.json, row 2" in message and expected in message


def test_an_assistant_turn_with_only_a_tool_call_is_fine():
    row = {"conversations": [{"from": "human", "value": "x"},
                             {"from": "function_call", "value": '{"name": "f", "arguments": "{\\"a\\": 1}"}'},
                             {"from": "observation", "value": "1"}, {"from": "gpt", "value": "done"}]}
    conv = conversation_of(row)
    assert conv.messages[1] == {"role": "assistant", "content": "",
                                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}


# ---------------------------------------------------------------------------- LLaMA-Factory mappings

def test_sharegpt_mapping_renames_column_and_tags():
    mapping = DATASET_INFO["mllm_demo"] | {"columns": {"messages": "messages"}}  # text only: no images column
    row = {"messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]}
    assert detect_format([row], "m.json", mapping) == "sharegpt"  # without a mapping it would be "messages"
    assert conversation_of(row, mapping=mapping).messages == [{"role": "user", "content": "Who?"},
                                                              {"role": "assistant", "content": "Me."}]
    odd = {"formatting": "sharegpt", "columns": {"messages": "dialog", "system": "sys"},
           "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "Q", "assistant_tag": "A"}}
    row = {"dialog": [{"speaker": "Q", "text": "2+2?"}, {"speaker": "A", "text": "4"}], "sys": "Maths."}
    assert [(m["role"], m["content"]) for m in conversation_of(row, mapping=odd).messages] == [
        ("system", "Maths."), ("user", "2+2?"), ("assistant", "4")]


def test_alpaca_mapping_renames_columns():
    mapping = {"columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "h"}}  # formatting: alpaca
    row = {"q": "Sum", "ctx": "1 2", "a": "3", "h": [["hi", "hello"]], "system": "not mapped: not read"}
    assert detect_format([row], "x.json", mapping) == "alpaca"
    assert [(m["role"], m["content"]) for m in conversation_of(row, mapping=mapping).messages] == [
        ("user", "hi"), ("assistant", "hello"), ("user", "Sum\n\n1 2"), ("assistant", "3")]
    assert not usable_alpaca({"q": "Sum", "a": ""}, mapping)


@pytest.mark.parametrize("mapping, expected", [
    (DATASET_INFO["mllm_demo"], "names columns 'images'"),
    ({"formatting": "ranking"}, "formatting 'ranking'"),
    ({"formatting": "sharegpt", "ranking": True}, "preference pairs"),
    ({"formatting": "sharegpt", "columns": {"messages": "dialog"}}, "no column 'dialog'"),
    ({"formatting": "sharegpt", "tags": {"speaker_tag": "x"}}, "names tags 'speaker_tag'"),
])
def test_bad_mappings_are_refused(mapping, expected):
    message = refused(detect_format, [{"messages": []}], "m.json", mapping)
    assert "m.json" in message and expected in message


# ---------------------------------------------------------------------------- Parquet and datasets

def test_parquet_with_nested_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": "f?"}, {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]}]
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    read = read_parquet(str(path))
    assert read[0]["messages"][0]["tool_calls"] is None  # Arrow gives every message every field
    kept, _ = read_conversations(read, detect_format(read, str(path)), str(path))
    assert kept[0][1].messages == rows[0]["messages"]  # the nulls are gone
    assert kept[1][1].messages[1]["tool_calls"][0]["function"]["arguments"] == {}
    assert "not found" in refused(read_parquet, str(tmp_path / "nope.parquet"))
    (tmp_path / "bad.parquet").write_text("not parquet", encoding="utf-8")
    assert "could not be read as Parquet" in refused(read_parquet, str(tmp_path / "bad.parquet"))


def test_load_hub_rows_from_a_local_folder(tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", tmp_path / "cache")  # not the user's cache
    folder = tmp_path / "ds"
    folder.mkdir()
    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_hub_rows(str(folder), None, "train") == rows
    message = refused(load_hub_rows, str(folder), None, "validation")
    assert "validation" in message and "'train'" in message and "pass one of those it names" in message
    message = refused(load_hub_rows, str(tmp_path / "missing"), None, "train")
    assert "could not be loaded" in message
    message = refused(load_hub_rows, "nobody-here/no-such-dataset", None, "train")  # offline in tests
    assert "nobody-here/no-such-dataset" in message
    assert "Generating" not in capfd.readouterr().err  # no progress bars


# ---------------------------------------------------------------------------- any input: a conversation or one line

MESSY = ["\u0085", "😀", "\x00", "w" * 10_000, "", " ", "\n", "<|im_end|>", "Ünïcödé", "\r\n"]
_text = st.one_of(st.sampled_from(MESSY), st.text(max_size=20))
_from = st.sampled_from(
    ["human", "gpt", "system", "observation", "user", "assistant", "function_call", "robot", "tool"])


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(_from, _text), max_size=8), system=st.one_of(st.none(), _text))
def test_any_sharegpt_row_is_a_checked_conversation_or_one_line(turns, system):
    row = {"conversations": [{"from": role, "value": value} for role, value in turns], "system": system}
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
             "observation": "tool", "function_call": "assistant"}
    try:
        conv = conversation_of(row, "sharegpt")
    except UserError as exc:
        assert "\n" not in str(exc) and "t.json, row 1" in str(exc)
        return
    body = conv.messages[1:] if (system or "").strip() else conv.messages
    assert [m["role"] for m in body] == [roles[role] for role, _ in turns]
    assert [m["content"] for m in body if not m.get("tool_calls")] == [v for r, v in turns if r != "function_call"]
    assert any(m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls")) for m in conv.messages)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
    "content": st.one_of(_text, st.none(), st.integers())}), max_size=8))
def test_any_messages_row_is_a_checked_conversation_or_one_line(messages):
    try:
        conv = conversation_of({"messages": messages}, "messages")
    except UserError as exc:
        assert "\n" not in str(exc) and "t.json, row 1" in str(exc)
        return
    assert conv.messages == messages
