"""A finished run's files are one unit (issue 27, class 1): the swap that moves a new run's files in for the
previous run's is journaled, so a stop at any of its steps is completed by the next start, and a reader never
uses a folder caught half-way."""
from __future__ import annotations

import json

import pytest

from harness.errors import UserError
from harness.run import swap


class Killed(BaseException):
    """What a kill -9 does to a swap: it stops between two steps, and nothing after runs."""


def _old_and_new(tmp_path):
    out = tmp_path / "run"
    staging = out / ".staging-1"
    staging.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"old weights")
    (out / "adapter_config.json").write_text('{"r": 4}')
    (out / "old_only.txt").write_text("written by the old run only")
    (out / "checkpoint-5").mkdir()
    old_record = {"status": "ok", "started_at": "old", "files": ["adapter_config.json", "adapter_model.safetensors",
                                                                   "old_only.txt"]}
    (out / "result.json").write_text(json.dumps(old_record))
    (staging / "adapter_model.safetensors").write_bytes(b"new weights")
    (staging / "adapter_config.json").write_text('{"r": 8}')
    (staging / "tokenizer").mkdir()
    (staging / "tokenizer" / "vocab.json").write_text("{}")
    return out, staging, old_record


def _holds_the_new_run_whole(out):
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                     "checkpoint-5", "result.json", "tokenizer"]
    assert (out / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert json.loads((out / "adapter_config.json").read_text()) == {"r": 8}
    record = json.loads((out / "result.json").read_text())
    assert record["started_at"] == "new" and record["files"] == ["adapter_config.json", "adapter_model.safetensors",
                                                                  "tokenizer"]


def test_an_uninterrupted_swap_leaves_the_new_run_and_no_journal(tmp_path):
    out, staging, _ = _old_and_new(tmp_path)
    swap.swap_in(out, staging, {"status": "ok", "started_at": "new"}, ["adapter_config.json",
                                                                      "adapter_model.safetensors", "old_only.txt"])
    _holds_the_new_run_whole(out)
    assert swap.roll_forward(out) is False


STEPS = 7  # journal written, 3 moves, 1 removal, record written, journal removed (after the last _step)


@pytest.mark.parametrize("stop_after", range(STEPS - 1))
def test_a_stop_after_any_step_is_completed_by_the_next_start(tmp_path, monkeypatch, capsys, stop_after):
    out, staging, _ = _old_and_new(tmp_path)
    steps = []

    def step(what):
        steps.append(what)
        if len(steps) > stop_after:
            raise Killed(what)

    monkeypatch.setattr(swap, "_step", step)
    with pytest.raises(Killed):
        swap.swap_in(out, staging, {"status": "ok", "started_at": "new"},
                     ["adapter_config.json", "adapter_model.safetensors", "old_only.txt"])
    # Caught half-way: a reader refuses the folder, in one line naming the fix.
    with pytest.raises(UserError, match="rerun that run's command to complete it"):
        swap.refuse_while_swapping(out)
    assert swap.pending_record(out)["started_at"] == "new"
    monkeypatch.setattr(swap, "_step", lambda what: None)
    assert swap.roll_forward(out) is True
    assert "completed moving in the files of the run stopped while finishing" in capsys.readouterr().out
    _holds_the_new_run_whole(out)
    swap.refuse_while_swapping(out)  # whole again: readable


def test_a_stop_before_the_journal_leaves_the_previous_run_whole(tmp_path, monkeypatch):
    out, staging, old_record = _old_and_new(tmp_path)

    def killed_while_writing(path, data):
        raise Killed("while writing the journal")

    monkeypatch.setattr(swap, "write_json_atomic", killed_while_writing)
    with pytest.raises(Killed):
        swap.swap_in(out, staging, {"status": "ok", "started_at": "new"}, ["adapter_model.safetensors"])
    assert (out / "adapter_model.safetensors").read_bytes() == b"old weights"
    assert json.loads((out / "result.json").read_text()) == old_record and swap.roll_forward(out) is False


def test_a_damaged_journal_moves_nothing_and_says_so(tmp_path):
    out, staging, old_record = _old_and_new(tmp_path)
    (out / swap.JOURNAL_FILE).write_text('{"staged": ["../../etc"]')
    with pytest.raises(UserError, match="is damaged"):
        swap.roll_forward(out)
    assert json.loads((out / "result.json").read_text()) == old_record
    assert swap.plain_names(["a.json", "../x", "/etc/passwd", "sub/b", "..", 3]) == ["a.json"]


def test_a_rerun_stopped_while_finishing_is_completed_by_the_same_command(tmp_path, monkeypatch, capsys):
    """Through a recipe: a rerun with --resume false is stopped half-way through moving its files in over a finished
    run; the next run into the folder completes that swap first: rerun with its settings, it finds the run finished,
    whole, with nothing to train."""
    from harness.models.adapters import open_adapter
    from harness.run.flow import load_recipe, run_recipe

    recipe = load_recipe("qwen2_7b_qlora")
    out = tmp_path / "run"
    argv = ["--model", "tiny-qwen2", "--max_samples", "16", "--max_seq_length", "96", "--max_steps", "1",
            "--eval_steps", "1", "--save_steps", "1", "--disable_tqdm", "true", "--output_dir", str(out)]
    first = run_recipe("qwen2_7b_qlora", recipe.DEFAULTS, argv)
    steps = []

    def step(what):
        steps.append(what)
        if what.startswith("moved adapter_model"):
            raise Killed(what)

    monkeypatch.setattr(swap, "_step", step)
    with pytest.raises(Killed):
        run_recipe("qwen2_7b_qlora", recipe.DEFAULTS, [*argv, "--resume", "false", "--seed", "43"])
    assert steps[0] == "journal written" and (out / swap.JOURNAL_FILE).exists()
    with pytest.raises(UserError, match="half-way through moving in"):
        open_adapter(out)
    monkeypatch.setattr(swap, "_step", lambda what: None)
    capsys.readouterr()
    again = run_recipe("qwen2_7b_qlora", recipe.DEFAULTS, [*argv, "--seed", "43"])
    said = capsys.readouterr().out
    assert "completed moving in the files of the run stopped while finishing" in said
    assert "already holds this run, finished" in said
    record = json.loads((out / "result.json").read_text())
    assert record["config"]["seed"] == 43 and record["started_at"] != first["started_at"]
    assert not (out / swap.JOURNAL_FILE).exists() and not list(out.glob(".staging-*"))
    assert again["status"] == "ok"
    open_adapter(out)  # whole: readable again
