"""A rerun into an existing output_dir resumes only what exactly its settings made, never mixes runs,
never loses a finished run's files, survives a checkpoint cut short, and a stopped run records itself."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.locations import RECIPES_DIR
from harness.run.flow import load_recipe, run_recipe
from harness.run.folder import LAST_ATTEMPT_FILE, LOCK_FILE, RESULT_FILE, SEAL_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QLORA = "qwen2_7b_qlora"
# The reproduction: stories260k, 40 rows, a checkpoint every 2 steps.
TINY = ["--model", "stories260k", "--max_samples", "40", "--max_seq_length", "128", "--save_steps", "2",
        "--eval_steps", "2", "--disable_tqdm", "true", "--save_total_limit", "5"]


def qlora(out, *flags: str) -> dict:
    return run_recipe(QLORA, load_recipe(QLORA).DEFAULTS, [*TINY, "--output_dir", str(out), *flags])


def refused(capsys, out, *flags: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        qlora(out, *flags)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{QLORA}: "), err
    return err[0]


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a finished run that a rerun must not touch."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != LOCK_FILE}


def test_a_rerun_resumes_only_its_own_settings_and_a_finished_run_stays(tmp_path, capsys):
    out = tmp_path / "X"
    first = qlora(out, "--max_steps", "4")
    assert first["status"] == "ok" and first["global_step"] == 4
    assert all((out / f"checkpoint-{n}" / SEAL_FILE).is_file() for n in (2, 4))

    # Other settings, checkpoints there: refused, naming what changed (not only a remembered list).
    message = refused(capsys, out, "--max_steps", "2", "--learning_rate", "1e-2")
    assert "other settings" in message and "learning_rate: 0.0001 -> 0.01" in message and "max_steps: 4 -> 2" in message
    for flags, changed in ((["--lora_alpha", "8"], "lora_alpha: 32 -> 8"), (["--lora_dropout", "0.2"], "lora_dropout"),
                           (["--max_seq_length", "120"], "max_seq_length: 128 -> 120"),
                           (["--prompt_format", "alpaca"], "prompt_format"), (["--r", "16"], "r: 8 -> 16")):
        assert changed in refused(capsys, out, "--max_steps", "4", *flags)

    # --resume false: starts over; the first run's checkpoints move aside, its finished files stay
    # until the new run finishes, then the new run's replace them.
    second = qlora(out, "--max_steps", "2", "--learning_rate", "1e-2", "--resume", "false")
    assert second["status"] == "ok" and second["global_step"] == 2 and second["resumed_from"] is None
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    (aside,) = out.glob("superseded-*")
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["config"]["learning_rate"] == 1e-2 and saved["global_step"] == 2

    # The same command without --resume false: that run is finished, nothing is done or touched
    # (the bug was resuming the first run's checkpoint-4 and ending at step 5 with its adapter).
    before = snapshot(out)
    third = qlora(out, "--max_steps", "2", "--learning_rate", "1e-2")
    assert "nothing to do" in capsys.readouterr().out
    assert third["global_step"] == 2 and snapshot(out) == before
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_only_complete_checkpoints_of_the_same_settings_are_resumed(tmp_path, capsys):
    out = tmp_path / "X"
    first = qlora(out, "--max_steps", "6")
    # What a kill -9 while checkpoint-6 was being saved leaves: no seal, files missing, a record saying
    # the run did not finish. (Every rerun used to fail on it until the user deleted it by hand.)
    (out / "checkpoint-6" / SEAL_FILE).unlink()
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    (out / RESULT_FILE).write_text(json.dumps({**first, "status": "interrupted"}))
    capsys.readouterr()
    again = qlora(out, "--max_steps", "6")
    printed = capsys.readouterr().out
    assert "checkpoint-6 is incomplete (cut short while being saved); removed, resuming from checkpoint-4" in printed
    assert again["status"] == "ok" and again["resumed_from"].endswith("checkpoint-4") and again["global_step"] == 6
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-4)  # as if never interrupted

    # A checkpoint sealed by other settings (copied in by hand, say) is never resumed: moved aside.
    seal = out / "checkpoint-4" / SEAL_FILE
    seal.write_text(json.dumps({"fingerprint": "someone-else", "global_step": 4}))
    (out / RESULT_FILE).write_text(json.dumps({**again, "status": "interrupted"}))
    capsys.readouterr()
    third = qlora(out, "--max_steps", "6")
    assert third["resumed_from"].endswith("checkpoint-6")
    assert "checkpoints made by other settings (checkpoint-4)" in capsys.readouterr().out


def test_a_failed_or_refused_rerun_never_replaces_a_finished_run(tmp_path, capsys, monkeypatch):
    out = tmp_path / "X"
    qlora(out, "--max_steps", "2")
    before = snapshot(out)

    # Refused before the folder is claimed: nothing written (the window is too short for the prompt;
    # no such layer in this model: both used to be found only after the folder was claimed).
    message = refused(capsys, out, "--max_steps", "2", "--max_seq_length", "16", "--resume", "false")
    assert "--max_seq_length 16 is too short" in message and "pass --max_seq_length" in message
    message = refused(capsys, out, "--max_steps", "2", "--target_modules", "no_such_proj", "--resume", "false")
    assert "no linear layer named no_such_proj" in message
    assert snapshot(out) == before and not (out / LAST_ATTEMPT_FILE).exists()

    # A rerun that fails after it started (here: out of memory building the trainer) keeps the finished
    # run's record and adapter; the attempt is recorded beside them, and said in one line.
    import torch

    from harness.objectives import sft

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sft, "build_trainer", out_of_memory)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        qlora(out, "--max_steps", "2", "--resume", "false")
    assert stop.value.code == 3
    assert capsys.readouterr().err.strip().split("\n")[-1].startswith(f"{QLORA}: out of GPU memory; try ")
    after, marker = snapshot(out), "recipe_run.json"  # the marker names the attempt's settings now
    assert {k: v for k, v in after.items() if k not in (LAST_ATTEMPT_FILE, marker)} == {
        k: v for k, v in before.items() if k != marker}
    attempt = json.loads((out / LAST_ATTEMPT_FILE).read_text())
    assert attempt["status"] == "oom" and "CUDA out of memory" in attempt["error"]
    assert json.loads((out / RESULT_FILE).read_text())["status"] == "ok"
    assert (aside := list(out.glob("superseded-*"))) and (aside[0] / "checkpoint-2" / SEAL_FILE).is_file()


def test_bad_output_dirs_are_refused_before_anything_is_written(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert "is not empty (notes.txt) and holds no run of this project" in refused(capsys, foreign, "--max_steps", "2")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is a file, not a folder" in refused(capsys, a_file, "--max_steps", "2")

    other = tmp_path / "other"
    other.mkdir()
    (other / "recipe_run.json").write_text(json.dumps({"recipe": "qwen2_7b_adalora"}))
    assert "holds a run of recipe 'qwen2_7b_adalora', not 'qwen2_7b_qlora'" in refused(capsys, other, "--max_steps", "2")

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "recipe_run.json").write_text("{not json")
    (damaged / "checkpoint-2").mkdir()
    message = refused(capsys, damaged, "--max_steps", "2")
    assert "recipe_run.json is damaged" in message and "--resume false" in message and "None" not in message


def test_a_second_run_in_the_same_folder_at_once_is_refused(tmp_path, capsys):
    out = tmp_path / "X"
    qlora(out, "--max_steps", "2")
    fd = os.open(out / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running run holds it
    try:
        assert "is in use by another run" in refused(capsys, out, "--max_steps", "2", "--resume", "false")
    finally:
        os.close(fd)


def test_rows_without_text_are_reported_not_silently_dropped(tmp_path, capsys):
    data = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f"review number {i} was fine,positive" if i % 2 else f"review {i} was bad,negative"
                             for i in range(30)]
    rows[4] = ",positive"
    rows[9] = "   ,negative"
    data.write_text("\n".join(rows) + "\n")
    record = qlora(tmp_path / "X", "--max_steps", "2", "--data_file", str(data))
    left_out = record["data"]["rows_left_out"]["data_file"]
    assert left_out == {"count": 2, "rows": [4, 9], "reason": "no text in column 'text'"}
    assert "left out 2 of 30 rows" in capsys.readouterr().out


def test_null_instruction_or_output_is_left_out_not_trained_as_none(tmp_path):
    from harness.data import examples
    from harness.data import reading as data_mod
    from harness.run.config import DataArguments

    path = tmp_path / "a.json"
    path.write_text(json.dumps([
        {"instruction": "Say hi.", "input": None, "output": "Hi."},
        {"instruction": None, "input": "", "output": "orphan answer"},
        {"instruction": "No answer.", "input": "", "output": None},
        {"instruction": "Count.", "output": "1 2 3"},
    ]))
    loaded = data_mod.load_records(DataArguments(data_file=str(path), task="instruction"))
    assert [r["output"] for r in loaded.rows] == ["Hi.", "1 2 3"] and loaded.left_out == [2, 3]
    assert "None" not in json.dumps([examples._instruction_example(r, DataArguments(task="instruction", prompt_format="alpaca"), None).prompt
                                     for r in loaded.rows])


def _recipe_process(tmp_path, *flags: str, **popen):
    return subprocess.Popen(
        [sys.executable, str(RECIPES_DIR / f"{QLORA}.py"), *TINY[:-4], "--output_dir", str(tmp_path / "X"),
         "--max_steps", "4000", "--save_steps", "2", "--eval_steps", "1000", "--load_best_model_at_end", "false", *flags],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, **popen,
    )


def _wait_for_first_checkpoint(tmp_path, process, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not (tmp_path / "X" / "checkpoint-2" / SEAL_FILE).is_file():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "interrupted")])
def test_a_stopped_run_records_itself_and_says_so_on_a_line_of_its_own(sig, said, tmp_path, interruptible):
    # Progress bars on (no --disable_tqdm): the message must still start on its own line.
    process = _recipe_process(tmp_path, "--disable_tqdm", "false", **interruptible)
    _wait_for_first_checkpoint(tmp_path, process)
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # say what the run was doing instead of stopping
        process.kill()
        pytest.fail(f"the run did not stop within 120 s of {sig.name}; its stderr ends: {process.communicate()[1][-2000:]}")
    assert process.returncode == 130, err
    last = err.rstrip("\n").split("\n")[-1]  # split on \n only: a bar's \r-redraws stay on its line
    assert last.startswith(f"{QLORA}: {said}; ") and "rerun the same command to resume" in last, err[-500:]
    record = json.loads((tmp_path / "X" / RESULT_FILE).read_text())
    assert record["status"] == "interrupted" and record["command"]
    assert (tmp_path / "X" / "checkpoint-2" / SEAL_FILE).is_file()  # checkpoints kept


def test_a_run_recorded_before_later_settings_keeps_its_fingerprint(recipe_argv):
    """Settings added later (TRL's SFTConfig ones, --dataset_name, ...) at their defaults change no fingerprint, so a
    rerun of a run recorded before them finds it finished or resumes it; set to anything else, they do."""
    import dataclasses

    from transformers import TrainingArguments
    from trl import SFTConfig

    from harness.run.command_line import parse_args
    from harness.run.folder import ADDED_LATER, fingerprinted

    config = parse_args({"recipe": "t"}, recipe_argv()).to_dict()
    trl_only = {f.name for f in dataclasses.fields(SFTConfig)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    recorded_before = {k: v for k, v in config.items() if k not in ADDED_LATER and (k not in trl_only or
                                                                                   k == "trust_remote_code")}
    assert fingerprinted(recorded_before) == fingerprinted(config)
    packed = parse_args({"recipe": "t"}, recipe_argv("--packing", "true")).to_dict()
    assert fingerprinted(packed)["packing"] is True
    assert fingerprinted(parse_args({"recipe": "t"}, recipe_argv("--dataset_split", "test")).to_dict())["dataset_split"] == "test"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, wanted
def test_a_sigterm_whose_exception_python_swallowed_still_stops_the_run_at_the_next_step():
    """The handler's Terminated, raised while Python runs a __del__, is printed as "Exception ignored" and lost (a
    run of test_a_stopped_run_records_itself... trained 2 minutes past its SIGTERM); the train clock raises it again
    at the step's end. Outside sigterm_as_interrupt nothing is left over."""
    import gc
    import os

    from harness.errors import Terminated, raise_if_terminated, sigterm_as_interrupt
    from harness.run.training import TrainClock

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # bytecodes: the handler runs in here, and its exception goes nowhere
                pass

    clock, state = TrainClock(), type("State", (), {"num_input_tokens_seen": 0})()
    with sigterm_as_interrupt():
        with sigterm_as_interrupt():  # a scope within (a recipe run by ft-cookbook or the alpaca100 pipeline)
            SignalledWhileCollected()  # collected at once; its SIGTERM's exception is swallowed
            gc.collect()
        with pytest.raises(Terminated):  # the inner scope's end does not forget it
            clock.on_step_end(None, state, None)
    raise_if_terminated()  # handled: a later run in this process starts clean
