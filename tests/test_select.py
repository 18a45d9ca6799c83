"""Selection picks exactly what its rules say, the same way every time, and writes files that reload."""
from __future__ import annotations

import csv
import json

import pytest

from harness.alpaca100.select import (
    SelectionArguments,
    instruction_complexity,
    main,
    select_records,
    word_count,
    write_selection,
)
from harness.errors import UserError


def rec(instruction: str, output_words: int, given: str = "", **extra) -> dict:
    return {"instruction": instruction, "input": given, "output": " ".join(["word"] * output_words), **extra}


def test_signals():
    assert word_count("Give three tips.") == 3
    assert word_count("解释一下") == 4  # every CJK character counts, as a word would
    assert instruction_complexity("Write a poem.") == 1
    # two sentences + "at least" + "must" + "compare", plus an input to work on
    assert instruction_complexity("Write a poem of at least 12 lines. It must compare two seasons.", "spring") == 6


def test_picks_by_the_rules_and_breaks_ties_by_file_order():
    rows = [
        rec("Write a line.", 10),  # 0: repeated below with a longer answer -> that version counts
        rec("Write a poem.", 40),  # 1
        rec("Write a longer poem.", 40),  # 2: one instruction word more than 1
        rec("Write a verse.", 30, given="x " * 20),  # 3: input words count in the conversation only
        rec("Write a poem.", 12),  # 4: repeats 1's prompt, less valuable -> never chosen
        rec("Explain step by step and compare each example.", 25),  # 5: complexity 7, ties with 3
        rec("Write a line.", 15),  # 6
    ]
    selection = select_records(rows, SelectionArguments(select_k=3, response_weight=1.0, complexity_weight=5.0))
    values = {s.index: s.value for s in selection.scored}
    # value = conversation words + 1.0 x response words + 5 x instruction complexity
    assert values[1] == (3 + 40) + 40 + 5 * 1
    assert values[2] == values[1] + 1
    assert values[3] == (3 + 20 + 30) + 30 + 5 * 2
    assert values[5] == (8 + 25) + 25 + 5 * 7 == values[3]
    ranked = sorted((s for s in selection.scored if s.selected), key=lambda s: s.rank)
    assert [s.index for s in ranked] == [3, 5, 2]  # 3 before 5: equal value, earlier in the file
    assert selection.records == [rows[3], rows[5], rows[2]]
    assert selection.scored[4].duplicate_of == 1 and selection.scored[0].duplicate_of == 6
    assert selection.summary()["duplicates_skipped"] == 2

    # Exact ties: the earlier record wins, on every run.
    tied = [rec("Same.", 20), rec("Also.", 20), rec("More.", 20)]
    for _ in range(3):
        assert select_records(tied, SelectionArguments(select_k=2)).records == tied[:2]


def test_a_score_field_weights_the_value():
    rows = [rec("A.", 100, score=1.0), rec("B.", 20, score=9.0), rec("C.", 60, score=2.0)]
    selection = select_records(rows, SelectionArguments(select_k=1))
    assert selection.score_field == "score"
    assert selection.records == [rows[1]]  # short but highly rated beats long and poorly rated
    assert select_records(rows, SelectionArguments(select_k=1, score_field="none")).records == [rows[0]]


@pytest.mark.parametrize(
    "rows, args, message",
    [
        ([rec("A.", 5)], SelectionArguments(select_k=2), "only 1 distinct records"),
        ([rec("A.", 5)], SelectionArguments(select_k=0), "at least 1"),
        ([rec("A.", 5)], SelectionArguments(score_field="stars"), "no such field"),
        ([rec("A.", 5, score=-1)], SelectionArguments(select_k=1), "number >= 0"),
        ([rec("A.", 5, score="good")], SelectionArguments(select_k=1), "number >= 0"),
        ([{"text": "no instruction"}], SelectionArguments(select_k=1), "instruction/input/output"),
    ],
)
def test_bad_input_is_refused_in_one_line(rows, args, message):
    with pytest.raises(UserError, match=message):
        select_records(rows, args)


def test_files_reload_and_the_command_runs(tmp_path, capsys):
    data = [rec(f"Task {i}.", 5 + 7 * i) for i in range(12)]
    source = tmp_path / "pool.json"
    source.write_text(json.dumps(data))
    main(["--data_file", str(source), "--select_k", "4", "--output_dir", str(tmp_path / "sel")])
    assert "Selected 4 of 12 records" in capsys.readouterr().out

    chosen = json.loads((tmp_path / "sel" / "selected.json").read_text())
    assert chosen == [data[11], data[10], data[9], data[8]]
    with open(tmp_path / "sel" / "selection_scores.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and sum(r["selected"] == "True" for r in table) == 4
    assert (tmp_path / "sel" / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "sel").glob(".*"))  # no temporary files left behind

    # Writing again is atomic and gives the same files.
    before = (tmp_path / "sel" / "selected.json").read_bytes()
    write_selection(select_records(data, SelectionArguments(select_k=4)), tmp_path / "sel")
    assert (tmp_path / "sel" / "selected.json").read_bytes() == before


def test_command_reports_a_missing_file_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--data_file", str(tmp_path / "missing.json")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "not found" in err and "\n" not in err
