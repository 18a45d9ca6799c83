"""Data that looks valid but is not what the user meant, and data code that must end on any text.

An --eval_file that overlaps the training rows is stated in one line and in result.json (one that is all
training rows is refused: tests/test_bad_input.py); a large eval set is said, and --eval_max_samples caps the
eval loss as well as the task metrics; preference pairs with the same two answers are counted and recorded (a file
of nothing else is refused); a turn without content names its row, turn and field. Every cut-to-fit path ends and
keeps its length bound on messy text: U+0085, emoji, 300,000-character words, empty turns.
"""
from __future__ import annotations

import json
import signal
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.data import formats
from harness.data import reading as data_mod
from harness.data.encoding import encode_rows
from harness.errors import UserError
from harness.models.loading import load_tokenizer
from harness.run.config import DataArguments, ModelArguments

LORA, DPO = "qwen2_5_0_5b_lora", "qwen2_5_0_5b_dpo"


def _alpaca(n: int, start: int = 0) -> list[dict]:
    return [{"instruction": f"Name colour number {k}.", "output": f"Colour {k} is blue."} for k in range(start, start + n)]


def _write(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _run(recipe: str, *argv: str) -> dict:
    from harness.run.flow import load_recipe, run_recipe

    return run_recipe(recipe, load_recipe(recipe).DEFAULTS, ["--model", "tiny-qwen2", "--max_steps", "1",
                                                             "--forgetting_file", "", "--disable_tqdm", "true", *argv])


def _config(recipe: str, *argv: str):
    from harness.run.command_line import parse_args
    from harness.run.flow import load_recipe

    return parse_args({**load_recipe(recipe).DEFAULTS, "recipe": "t"}, ["--model", "tiny-qwen2", *argv])


# ---------------------------------------------------------------------------- --eval_file and the training rows

def test_eval_rows_that_are_training_rows_are_stated_and_recorded(tmp_path, capsys, one_torch_thread):
    train = _write(tmp_path / "train.jsonl", _alpaca(8))
    # rows 2 and 4 are training rows 3 and 1, in another layout: other whitespace, key order, an id beside them
    trained = [{"id": 7, "output": "  Colour 3 is  blue.", "instruction": "Name colour number 3.\n"},
               {"instruction": "Name colour number 1.", "output": "Colour 1 is blue."}]
    evaluated = _write(tmp_path / "eval.jsonl", [_alpaca(1, 20)[0], trained[0], _alpaca(1, 21)[0], trained[1],
                                                 _alpaca(1, 22)[0]])
    record = _run(LORA, "--data_file", train, "--eval_file", evaluated, "--output_dir", str(tmp_path / "run"))
    said = capsys.readouterr().out
    assert ("Data: 2 of 5 --eval_file rows are also training rows (rows 2, 4): their scores are not held-out "
            "(kept and scored as given, and recorded in result.json)") in said
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved == record and saved["status"] == "ok"
    assert saved["data"]["rows_left_out"]["eval_file"]["rows_also_trained_on"] == {"count": 2, "of": 5, "rows": [2, 4]}
    assert saved["data"]["eval_examples"] == 5  # kept and scored, as the line says
    assert "rows_also_trained_on" not in saved["data"]["rows_left_out"]["data_file"]


@pytest.mark.parametrize("task, train, evaluated", [
    # the review is what is trained on, not its label; its whitespace aside
    ("classification", [{"text": "A fine film.", "label": "positive"}, {"text": "Dull.", "label": "negative"}],
     [{"text": " A fine  film. ", "label": "negative"}, {"text": "Sharp.", "label": "positive"}]),
    # a CSV reads every field as text where JSON keeps numbers; a column beside the content is not content
    ("instruction", [{"instruction": "Add 2 and 3.", "input": 5, "output": "5"}],
     [{"instruction": "Add 2 and 3.", "input": "5", "output": "5", "source": "x"},
      {"instruction": "Add 1 and 1.", "output": "2"}]),
    # Parquet adds nulls for the fields other rows have
    ("instruction", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": None}]},
      {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]),
])
def test_rows_are_compared_by_their_content(tmp_path, task, train, evaluated):
    args = DataArguments(task=task, data_file="unused", eval_file=_write(tmp_path / "eval.jsonl", evaluated))
    records = data_mod.load_eval_records(args)
    assert data_mod.split_records(train, args, records) == (train, records.rows)
    assert records.also_trained == [1]
    assert records.report()["rows_also_trained_on"] == {"count": 1, "of": 2, "rows": [1]}


def test_an_eval_file_of_only_training_rows_but_from_a_shorter_run_is_stated_not_refused(tmp_path, capsys):
    """--max_samples trains on the first rows only: the training file as --eval_file then holds held-out rows too."""
    path = _write(tmp_path / "rows.jsonl", _alpaca(6))
    cfg = _config(LORA, "--data_file", path, "--eval_file", path, "--max_samples", "2", "--output_dir", "unused")
    from harness.run.flow import preflight

    work = preflight(cfg, output_dir=False)
    assert work.eval_data.also_trained == [1, 2] and len(work.eval_rows) == 6
    assert "Data: 2 of 6 --eval_file rows are also training rows (rows 1, 2)" in capsys.readouterr().out


# ---------------------------------------------------------------------------- how much is scored

def test_a_large_eval_set_is_said_before_loading_and_the_cap_silences_it(tmp_path, capsys):
    from harness.run.flow import preflight

    train, evaluated = _write(tmp_path / "t.jsonl", _alpaca(4)), _write(tmp_path / "e.jsonl", _alpaca(1_001, 10))
    preflight(_config(LORA, "--data_file", train, "--eval_file", evaluated, "--output_dir", "unused"), output_dir=False)
    assert capsys.readouterr().out.splitlines() == [
        "Data: --eval_file holds 1,001 rows, every one scored at each evaluation; --eval_max_samples N scores only "
        "the first N"]
    preflight(_config(LORA, "--data_file", train, "--eval_file", evaluated, "--eval_max_samples", "8",
                      "--output_dir", "unused"), output_dir=False)
    assert capsys.readouterr().out == ""
    # the validation split too
    big = _write(tmp_path / "big.jsonl", _alpaca(2_100))
    preflight(_config(LORA, "--data_file", big, "--validation_split", "0.5", "--output_dir", "unused"),
              output_dir=False)
    assert "Data: the validation split (--validation_split 0.5) holds 1,050 rows" in capsys.readouterr().out


@pytest.mark.parametrize("where", ["--eval_file", "--validation_split"])
def test_eval_max_samples_caps_the_eval_loss_too(tmp_path, where, one_torch_thread):
    train = _write(tmp_path / "t.jsonl", _alpaca(30))
    source = (["--eval_file", _write(tmp_path / "e.jsonl", _alpaca(12, 100))] if where == "--eval_file"
              else ["--validation_split", "0.4"])
    _run(LORA, "--data_file", train, *source, "--eval_max_samples", "3", "--output_dir", str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    # the eval loss's examples, not only the task metrics' (before: all 12 of the file, or of the split)
    assert saved["status"] == "ok" and saved["data"]["eval_examples"] == 3 and saved["eval_loss"] is not None


# ---------------------------------------------------------------------------- preference pairs

def test_pairs_with_the_same_answers_are_counted_and_recorded(tmp_path, capsys, one_torch_thread):
    pairs = [{"prompt": f"Say hi ({k}).", "chosen": "Hi!", "rejected": "Go away." if k % 3 else " Hi! "}
             for k in range(10)]
    record = _run(DPO, "--data_file", _write(tmp_path / "pairs.jsonl", pairs), "--max_seq_length", "64",
                  "--validation_split", "0.2", "--output_dir", str(tmp_path / "run"))
    assert (f"Data: 4 of 10 pairs of {tmp_path / 'pairs.jsonl'} have the same chosen and rejected answer "
            "(rows 1, 4, 7, 10): they teach DPO nothing") in capsys.readouterr().out
    assert record["status"] == "ok"
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["data"]["rows_left_out"]["data_file"]["pairs_with_the_same_answers"] == {
        "count": 4, "of": 10, "rows": [1, 4, 7, 10]}


def test_a_conversation_pair_with_the_same_answers_is_refused_when_all_are(tmp_path):
    turn = [{"role": "user", "content": "Say hi."}]
    pairs = [{"prompt": turn, "chosen": [{"role": "assistant", "content": "Hi!"}],
              "rejected": [{"role": "assistant", "content": "Hi!\n"}]}]
    with pytest.raises(UserError, match="its one pair has the same chosen and rejected answer"):
        data_mod.load_records(DataArguments(task="preference", data_file=_write(tmp_path / "p.jsonl", pairs)))


# ---------------------------------------------------------------------------- turns without content

@pytest.mark.parametrize("row, expected", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
     'row 1, message 2: the assistant\'s answer is missing ("content" is null)'),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n "}]},
     'row 1, message 2: the assistant\'s answer is empty ("content" is blank)'),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]},
     'row 1, message 1: the user\'s text is missing (no "content" field); give it its text or delete the row'),
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant"}]},
     'row 1, completion message 1: the assistant\'s answer is missing (no "content" field)'),
    # the system column adds a message before the turns: the turn is named by its own number
    ({"system": "Be brief.", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt"}]},
     'row 1, turn 2: the assistant\'s answer is missing (no "value" field)'),
])
def test_a_turn_without_content_names_the_row_the_turn_and_the_field(row, expected):
    with pytest.raises(UserError) as refused:
        formats.read_conversations([row], formats.detect_format([row], "f.jsonl"), "f.jsonl")
    assert expected in str(refused.value) and "None" not in str(refused.value)


def test_a_blank_user_turn_and_a_tool_call_without_content_are_kept():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    rows = [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                          {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}]}]
    kept, _ = formats.read_conversations(rows, "messages", "f.jsonl")
    assert [number for number, _ in kept] == [1, 2]


# ---------------------------------------------------------------------------- every cut ends, every cut fits

HUGE_WORD = "w" * 300_000
MESSY = ["\u0085", "\U0001F600", "\U0001F469\u200D\U0001F4BB", "\x00", "\u2028", "", " ", "\n", "Ünïcödé", "x" * 3_000]


@contextmanager
def ends_within(seconds: int):
    def hung(*_):
        raise TimeoutError(f"did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module", params=["tiny-qwen2", "stories260k"])
def tokenizer(request):
    return load_tokenizer(ModelArguments(model=request.param))


def _row(fmt: str, texts: list[str]) -> dict:
    a, b, c = (texts + ["", "", ""])[:3]
    if fmt == "alpaca":
        return {"instruction": a or "x", "input": b, "output": c or "y"}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": c or "y"},
                             {"role": "user", "content": b}, {"role": "assistant", "content": a + c or "z"}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "human", "value": a}, {"from": "gpt", "value": c or "y"}]}
    if fmt == "prompt_completion":
        return {"prompt": a + b, "completion": c or "y"}
    return {"text": a + b + c or "t"}


def _encoded_within(rows: list[dict], tokenizer, max_len: int) -> tuple[list, dict] | None:
    """encode_rows ends on the rows and every example fits max_len; a window too short for them, or a row without
    an answer (U+0085 alone is blank), is refused in one line (a UserError), never a hang or another error."""
    args = DataArguments(task="instruction", max_seq_length=max_len, prompt_format="auto", data_file="messy.jsonl")
    with ends_within(120):
        try:
            encoded, counts = encode_rows(rows, args, tokenizer)
        except UserError as refused:
            assert any(part in str(refused) for part in ("--max_seq_length", "chat template", "messy.jsonl, row")), refused
            return None
    assert len(encoded) + counts.get("too_long", 0) == len(rows)
    for example in encoded:
        assert len(example.input_ids) <= max_len and len(example.labels) == len(example.input_ids)
    return encoded, counts


_pieces = st.lists(st.one_of(st.sampled_from(MESSY), st.text(max_size=20)), max_size=8).map("".join)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["alpaca", "messages", "sharegpt", "prompt_completion", "text"]),
       texts=st.lists(_pieces, min_size=1, max_size=3), max_len=st.integers(min_value=1, max_value=200))
def test_any_messy_row_is_encoded_within_its_window_and_ends(tokenizer, fmt, texts, max_len):
    _encoded_within([_row(fmt, texts)], tokenizer, max_len)


@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt", "prompt_completion", "text"])
def test_a_300000_character_word_is_cut_to_the_window_and_ends(tokenizer, fmt):
    # In every field at once: the instruction, never cut, fills the window (that row is left out and counted, as a
    # conversation whose first answer starts beyond it; before, it refused the whole run); then in the input alone.
    done = _encoded_within([_row(fmt, [HUGE_WORD, HUGE_WORD + "\u0085", HUGE_WORD]), _row(fmt, ["hi", HUGE_WORD, "yo"])],
                           tokenizer, 64)
    assert done is not None
    encoded, counts = done
    assert len(encoded) == (2 if fmt in ("text", "prompt_completion") else 1)
    assert counts.get("too_long", 0) == 2 - len(encoded)


def _judge(tokenizer, positions: int):
    from harness.evaluation.judge import LocalModelJudge

    judge = object.__new__(LocalModelJudge)  # the fitting needs the tokenizer only, not the model
    judge.tokenizer, judge.max_positions, judge.id = tokenizer, positions, "local:test"
    return judge


def _judge_prompt_tokens(judge, question: str, answer: str) -> int:
    from harness.evaluation.judge_scores import DIMENSION_NAMES, DIMENSIONS

    longest = max(DIMENSIONS, key=lambda d: len(DIMENSION_NAMES[d]))
    return len(judge._ids(judge._prompt(longest, question, answer)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(question=_pieces, answer=_pieces, repeat=st.sampled_from([1, 10, 30]), positions=st.integers(120, 400))
def test_the_local_judge_fits_any_question_and_answer_and_ends(tokenizer, question, answer, repeat, positions):
    judge = _judge(tokenizer, positions)
    with ends_within(120):
        try:
            question, answer = judge._fit(question * repeat, answer * repeat)
        except UserError as refused:  # the judging prompt alone is longer than the model's positions
            assert "use a judge model with a longer context" in str(refused)
            return
    assert _judge_prompt_tokens(judge, question, answer) <= positions - 1


@pytest.mark.parametrize("question, answer", [("\u0085" * 3_000, ""), (HUGE_WORD, HUGE_WORD), ("q", "\U0001F600" * 3_000)])
def test_the_local_judge_cuts_what_decoding_would_grow(tokenizer, question, answer):
    # Before: four rounds of decode-and-retokenize left 3,000 U+0085 at 341 tokens for a 199-token model.
    judge = _judge(tokenizer, 200)
    with ends_within(120):
        question, answer = judge._fit(question, answer)
    assert _judge_prompt_tokens(judge, question, answer) <= 199
