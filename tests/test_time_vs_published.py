"""The time planner beside published throughput figures (harness/plan/time_vs_published.py): every row predicted
offline, the fitted matmul fraction in harness/plan/timing.py equal to what the rows fit, the fit made on the
transformers + PEFT rows only, and the markdown written whole."""
from __future__ import annotations

import dataclasses

import pytest

from harness.plan import time_vs_published as tvp
from harness.plan.timing import MATMUL_FRACTION


@pytest.fixture(scope="module")
def rows():
    return tvp.predictions()  # every published figure, counted on the real shapes (7B, 8B, 3B) on the meta device


def test_every_published_figure_is_predicted_offline(rows):
    assert len(rows) == len(tvp.PUBLISHED_SPEEDS) >= 20
    for row in rows:
        assert row.tokens_per_step > 0 and row.peak_compute_seconds > 0 and row.other_seconds > 0
        assert row.figure(MATMUL_FRACTION) > 0 and row.published_step_seconds > 0
    stacks = {row.entry.stack for row in rows}
    assert {tvp.TRANSFORMERS_PEFT, tvp.UNSLOTH, tvp.TORCHTUNE} <= stacks
    guide = next(row for row in rows if row.entry.unit == tvp.MINUTES_PER_EPOCH)
    assert guide.tokens_per_step == 4 * 512  # batch 1 x accumulation 4 at 512 tokens
    assert guide.published_step_seconds == pytest.approx(guide.entry.figure * 60 / 25)  # 100 records / 4 a step


def test_the_fraction_in_timing_is_what_the_rows_fit(rows):
    # A change in the rows, the count or the other constants without refitting fails here.
    assert MATMUL_FRACTION == round(tvp.fit(rows), 2)


def test_the_fit_uses_only_the_fitted_transformers_peft_rows(rows):
    fitted = [i for i, row in enumerate(rows) if row.entry.fitted]
    assert fitted and all(rows[i].entry.stack == tvp.TRANSFORMERS_PEFT for i in fitted)
    assert any(row.entry.stack == tvp.TRANSFORMERS_PEFT and not row.entry.fitted for row in rows)  # the guides

    vendor = next(i for i, row in enumerate(rows) if row.entry.stack == tvp.UNSLOTH)
    assert tvp.fit(_slower(rows, [vendor], 10)) == tvp.fit(rows)
    assert tvp.fit(_slower(rows, fitted, 3)) == pytest.approx(tvp.fit(rows) / 3, rel=0.5)  # lower, roughly a third
    assert tvp.fit(_slower(rows, fitted, 3)) < tvp.fit(rows) / 2


def _slower(rows, indices, factor):
    """The rows with the published figures at `indices` made `factor` times slower."""
    def slowed(row):
        entry = row.entry
        figure = entry.figure / factor if entry.unit == tvp.TOKENS_PER_SECOND else entry.figure * factor
        return dataclasses.replace(row, entry=dataclasses.replace(entry, figure=figure),
                                   published_step_seconds=row.published_step_seconds * factor)
    return [slowed(row) if i in indices else row for i, row in enumerate(rows)]


def test_held_out_errors_use_the_fraction_fitted_on_the_others(rows):
    held = tvp.leave_one_out(rows)
    fitted = [i for i, row in enumerate(rows) if row.entry.fitted]
    assert sorted(held) == fitted
    i = fitted[0]
    others = tvp.fit([rows[j] for j in fitted if j != i])
    assert held[i] == pytest.approx(rows[i].figure(others) / rows[i].entry.figure - 1)


def test_a_prediction_moves_with_the_fraction_and_the_fit_is_not_circular(rows, monkeypatch):
    row = rows[0]
    assert row.entry.unit == tvp.TOKENS_PER_SECOND
    assert row.figure(0.2) < row.figure(0.4) < row.figure(0.8)  # faster matmuls, more tokens a second
    assert row.implied_fraction == pytest.approx(row.peak_compute_seconds / (
        row.published_step_seconds - row.other_seconds))
    assert row.error(row.implied_fraction) == pytest.approx(0, abs=1e-9)
    import harness.plan.timing as timing

    monkeypatch.setattr(timing, "MATMUL_FRACTION", 0.2)  # what the row implies does not hang on the constant
    again = tvp.predict(row.entry)
    assert again.peak_compute_seconds == pytest.approx(row.peak_compute_seconds)
    assert again.implied_fraction == pytest.approx(row.implied_fraction)
    assert "x 0.2 matmul" in again.speed_source


def test_vendor_rows_say_their_kernels_beat_the_model(rows):
    unsloth = next(row for row in rows if row.entry.stack == tvp.UNSLOTH)
    assert tvp.verdict(unsloth, MATMUL_FRACTION).startswith("its own kernels beat the model by ")
    ours = next(row for row in rows if row.entry.fitted)
    assert tvp.verdict(ours, ours.implied_fraction) == "within +-25%"
    assert tvp.verdict(ours, ours.implied_fraction * 10).startswith("miss: the model is ")


def test_the_markdown_has_every_row_the_share_and_the_data_sheets(rows):
    text = tvp.markdown(rows)
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| source ")]
    assert len(table) == len(rows)
    assert tvp.COMMAND in text and "Within +-25%, transformers + PEFT rows: " in text
    assert "T4: NVIDIA T4 data sheet" in text and "L40S: NVIDIA L40S data sheet" in text
    assert "its own kernels beat the model by" in text and "## Not predicted" in text


def test_the_command_writes_the_file_whole(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tvp, "PUBLISHED_SPEEDS", [e for e in tvp.PUBLISHED_SPEEDS if e.source == tvp.PEFT][:2])
    output = tmp_path / "time.md"
    assert tvp.main(["--output", str(output)]) == 0
    assert capsys.readouterr().out == f"wrote {output}\n"
    text = output.read_text(encoding="utf-8")
    assert text.startswith("# The time planner beside published throughput figures") and text.endswith("\n")
    assert text.count("| PEFT method_comparison") == 2
    assert not list(tmp_path.glob(".time.md.*"))  # no temporary file left beside it
    output.write_text("kept", encoding="utf-8")
    with pytest.raises(SystemExit) as refused:  # an existing file is replaced only when asked
        tvp.main(["--output", str(output)])
    assert refused.value.code == 2 and output.read_text(encoding="utf-8") == "kept"
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert tvp.main(["--output", str(output), "--overwrite"]) == 0 and output.read_text(encoding="utf-8") == text
