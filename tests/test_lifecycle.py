"""A run's life as the process lives it (issue 27): a rerun that finds the run's last checkpoint has nothing to
train; a real kill -9 while a finished run's files are moved in leaves a folder the next run completes, whole; a run
whose weights turn NaN fails in one line and keeps its last checkpoint with finite weights; a full disk is one line,
a failed record, an unsealed checkpoint the next run ignores. The process-level cases run in fresh processes."""
from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from harness.run.flow import load_recipe, run_recipe
from harness.run.folder import RESULT_FILE, SEAL_FILE
from harness.run.swap import JOURNAL_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QLORA = "qwen2_7b_qlora"
TINY = ["--model", "stories260k", "--max_samples", "40", "--max_seq_length", "128", "--disable_tqdm", "true"]
FOUR_STEPS = [*TINY, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2"]


class Killed(BaseException):
    """Stands for a kill between saving the last checkpoint and finishing: nothing after it runs."""


def _adapter(path: Path) -> dict:
    return load_file(str(path / "adapter_model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ a checkpoint at the last step: nothing to train

def _dpo_pairs(tmp_path: Path) -> Path:
    pairs = [{"prompt": f"Question {i}: which colour is the sky?", "chosen": "Blue.", "rejected": f"Green {i}."}
             for i in range(20)]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs))
    return data


# recipe, the objective's module (its save_final is where the first run is stopped), settings. Each run stops at
# max_steps 2 in the middle of an epoch, where transformers' loop, resumed at step 2, trained a third step.
LAST_STEP_CASES = {
    "sft": (QLORA, "sft", lambda tmp: [*TINY, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2"]),
    "dpo": ("qwen2_5_0_5b_dpo", "dpo", lambda tmp: [
        "--model", "tiny-qwen2", "--data_file", str(_dpo_pairs(tmp)), "--validation_split", "0.25",
        "--max_seq_length", "64", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2",
        "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3", "--disable_tqdm", "true"]),
    "grpo": ("qwen2_5_0_5b_grpo", "grpo", lambda tmp: [
        "--model", "tiny-qwen2", "--max_samples", "12", "--eval_max_samples", "2", "--max_steps", "2",
        "--save_steps", "2", "--num_generations", "2", "--per_device_train_batch_size", "2",
        "--max_completion_length", "8", "--disable_tqdm", "true"]),
}


@pytest.mark.parametrize("case", sorted(LAST_STEP_CASES))
def test_a_rerun_that_finds_the_last_checkpoint_trains_nothing_and_finishes_from_it(case, tmp_path, monkeypatch,
                                                                                     capsys):
    """The first run saves and seals its checkpoint at max_steps, then is stopped before it finishes. The rerun
    trains 0 steps (it used to train one past max_steps and record ok) and finishes the run with that checkpoint's
    weights, saying so in its record."""
    name, module, settings = LAST_STEP_CASES[case]
    recipe, out = load_recipe(name), tmp_path / "run"
    argv = [*settings(tmp_path), "--output_dir", str(out)]
    objective = importlib.import_module(f"harness.objectives.{module}")

    def killed(*args, **kwargs):
        raise Killed("after the last checkpoint, before the final save")

    monkeypatch.setattr(objective, "save_final", killed)
    funcs = getattr(recipe, "REWARD_FUNCS", ())
    with pytest.raises(Killed):
        run_recipe(name, recipe.DEFAULTS, argv, reward_funcs=funcs)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / SEAL_FILE).is_file() and not (out / "adapter_model.safetensors").exists()
    saved_weights = _adapter(checkpoint)
    monkeypatch.undo()

    capsys.readouterr()
    record = run_recipe(name, recipe.DEFAULTS, argv, reward_funcs=funcs)
    said = capsys.readouterr().out
    saved = json.loads((out / RESULT_FILE).read_text())
    assert saved["status"] == "ok" and saved["global_step"] == 2 and saved["tokens_trained"] == 0
    assert not any(entry.get("step", 0) > 2 for entry in saved["log_history"])
    assert _same_weights(_adapter(out), saved_weights)  # the run ends with its last checkpoint's adapter
    assert "checkpoint-2 is at step 2, the run's last: nothing left to train; finishing the run from it" in said
    assert saved == json.loads(json.dumps(record)) and saved["resumed_at_step"] == 2
    assert saved["steps_trained"] == 0 and saved["train_loss"] is None
    assert saved["resumed_from"] == str(checkpoint) and saved["stopped_by"] == "max_steps"


# ------------------------------------------------------------------ fresh processes, a test-only hook in a driver

def _driver(tmp_path: Path, hook: str, recipe: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """Run `recipe` in a fresh process after `hook` (Python, run first) has changed what the test needs changed."""
    script = tmp_path / "driver.py"
    script.write_text("import sys\n" + textwrap.dedent(hook) + textwrap.dedent("""
        from harness.run.flow import load_recipe, run_recipe

        run_recipe(sys.argv[1], load_recipe(sys.argv[1]).DEFAULTS, sys.argv[2:])
    """))
    return subprocess.run([sys.executable, str(script), recipe, *argv], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}, timeout=600)


def _the_one_line(err: str) -> str:
    """A run that failed says so in its last stderr line, one line, with no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = err.rstrip("\n").split("\n")
    assert sum(line.startswith(f"{QLORA}: ") for line in lines) == 1, err[-3000:]
    return lines[-1]


KILL_HOOK = """
    import hashlib, json, os, signal
    from pathlib import Path
    from harness.run import swap

    STOP_AT, WITNESS = os.environ["STOP_AT"], Path(os.environ["WITNESS"])
    swap_in = swap.swap_in

    def witnessed_swap_in(out, staging, record, old_files):
        adapter = (staging / "adapter_model.safetensors").read_bytes()
        WITNESS.write_text(json.dumps({"adapter_sha256": hashlib.sha256(adapter).hexdigest()}))
        return swap_in(out, staging, record, old_files)

    def step(what):
        if what == STOP_AT:
            os.kill(os.getpid(), signal.SIGKILL)  # as a kill -9 would: no handler, no finally

    swap.swap_in, swap._step = witnessed_swap_in, step
"""


def test_a_kill_9_while_moving_a_run_in_is_completed_by_the_next_run(tmp_path):
    """A finished run is in the folder; a rerun with --resume false and another seed is SIGKILLed between two steps
    of moving its files in (its adapter moved in, the rest not: the folder holds parts of two runs). The next run of
    its command (a fresh process) rolls the journal forward: the folder holds that run whole, its adapter the one it
    staged, its record listing exactly the files there. tests/test_swap.py stops the swap after every step."""
    out = tmp_path / "run"
    argv = [*TINY, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "2", "--output_dir", str(out)]
    first = run_recipe(QLORA, load_recipe(QLORA).DEFAULTS, argv)
    first_sha = _sha(out / "adapter_model.safetensors")
    witness = tmp_path / "staged.json"
    killed = _driver(tmp_path, KILL_HOOK, QLORA, [*argv, "--resume", "false", "--seed", "43"],
                     STOP_AT="moved adapter_model.safetensors", WITNESS=str(witness))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (out / JOURNAL_FILE).is_file() and json.loads((out / RESULT_FILE).read_text())["started_at"] == \
        first["started_at"]  # half-way: the previous record is still there, the journal says what comes
    staged_sha = json.loads(witness.read_text())["adapter_sha256"]
    assert staged_sha != first_sha  # another seed: another adapter, so the test can tell them apart
    assert _sha(out / "adapter_model.safetensors") == staged_sha  # beside the first run's record: mixed

    again = _driver(tmp_path, "", QLORA, [*argv, "--seed", "43"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "completed moving in the files of the run stopped while finishing" in again.stdout
    assert "already holds this run, finished" in again.stdout
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["status"] == "ok" and record["config"]["seed"] == 43
    assert _sha(out / "adapter_model.safetensors") == staged_sha
    assert record["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
    bookkeeping = {RESULT_FILE, "recipe_run.json", ".run.lock"}
    final_files = {p.name for p in out.iterdir() if p.name not in bookkeeping and not p.name.startswith(
        ("checkpoint-", "superseded-"))}
    assert final_files == set(record["files"])  # nothing of the first run left beside it, nothing missing
    assert not (out / JOURNAL_FILE).exists() and not list(out.glob(".staging-*"))


def test_a_run_whose_weights_turn_nan_fails_in_one_line_and_keeps_its_last_finite_checkpoint(tmp_path, capsys):
    """--learning_rate 1e30 (finite) with 2 warm-up steps: step 1 trains at 0, step 2 at 5e29 (finite, huge weights),
    step 3 turns them NaN. The run used to save NaN adapters and record ok."""
    out = tmp_path / "run"
    argv = [*TINY, "--max_steps", "4", "--save_steps", "1", "--eval_steps", "1", "--learning_rate", "1e30",
            "--warmup_steps", "2", "--lr_scheduler_type", "constant_with_warmup", "--output_dir", str(out)]
    run = _driver(tmp_path, "", QLORA, argv)
    assert run.returncode == 4, run.stderr[-3000:]
    expected = (f"{QLORA}: diverged at step 3: the weights became NaN or infinite; its last checkpoint with finite "
                "weights, checkpoint-2, is kept. Lower --learning_rate (or warm up longer) and rerun with --resume "
                "false or another --output_dir")
    assert _the_one_line(run.stderr) == expected
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["status"] == "failed" and record["error"] == f"RunFailed: {expected[len(QLORA) + 2:]}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert all((out / f"checkpoint-{n}" / SEAL_FILE).is_file() for n in (1, 2))
    assert not (out / "adapter_model.safetensors").exists()  # nothing NaN was saved as the run's adapter

    # The same command again resumes that checkpoint and fails the same way, in one line: never silently.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_recipe(QLORA, load_recipe(QLORA).DEFAULTS, argv)
    said = capsys.readouterr()
    assert stop.value.code == 4 and f"Resuming from {out / 'checkpoint-2'}" in said.out
    assert _the_one_line(said.err) == expected


DISK_FULL_HOOK = """
    import errno, os
    from transformers import Trainer

    save_optimizer = Trainer._save_optimizer_and_scheduler

    def disk_full_at_step_4(self, output_dir):  # the adapter of checkpoint-4 is written, its optimizer is not
        if self.state.global_step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(output_dir, "optimizer.pt"))
        return save_optimizer(self, output_dir)

    Trainer._save_optimizer_and_scheduler = disk_full_at_step_4
"""


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_rerun_resumes_the_one_before(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*FOUR_STEPS, "--output_dir", str(out)]
    run = _driver(tmp_path, DISK_FULL_HOOK, QLORA, argv)
    assert run.returncode == 4, run.stderr[-3000:]
    expected = f"{QLORA}: no space left on device in {out}: free space and rerun the same command to resume"
    assert _the_one_line(run.stderr) == expected
    record = json.loads((out / RESULT_FILE).read_text())
    assert record["status"] == "failed" and record["error"].startswith(f"RunFailed: {expected[len(QLORA) + 2:]}; ")
    assert "[Errno 28]" in record["error"]
    assert (out / "checkpoint-2" / SEAL_FILE).is_file()
    assert (out / "checkpoint-4" / "adapter_model.safetensors").is_file()  # cut short: left unsealed
    assert not (out / "checkpoint-4" / SEAL_FILE).exists()

    capsys.readouterr()
    again = run_recipe(QLORA, load_recipe(QLORA).DEFAULTS, argv)
    said = capsys.readouterr().out
    assert "checkpoint-4 is incomplete (cut short while being saved); removed, resuming from checkpoint-2" in said
    assert again["status"] == "ok" and again["resumed_at_step"] == 2 and again["global_step"] == 4


def test_pytorchs_writer_failing_on_a_full_disk_counts_as_a_full_disk(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError("... unexpected pos 576 vs 534"), no errno (measured on a
    64 KiB tmpfs); safetensors says "No space left on device (os error 28)" in its text only."""
    from collections import namedtuple

    from harness.errors import is_disk_full
    from harness.run import record

    writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 4096))
    assert record._disk_full(writer, tmp_path) == (
        f"no space left on device in {tmp_path}: free space and rerun the same command to resume")
    assert record._disk_full(RuntimeError("shape mismatch"), tmp_path) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, 1 << 30, 9 << 30))
    assert record._disk_full(writer, tmp_path) is None  # plenty of room: some other failure, kept as it is
    assert is_disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert is_disk_full(wrapped) and not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# In a mount namespace of its own: the tmpfs and what is on it go when the script ends, so it copies out what the
# test looks at. $1: the folder to mount it on, $2: the test's folder, then the command.
REAL_DISK_FULL = """
set -e
mount -t tmpfs -o size=1100k tmpfs "$1"
cd "$2"
set +e
"${@:3}"
echo "rc=$?"
ls -a "$1/run/checkpoint-4" > "$2/checkpoint-4.txt"
ls -a "$1/run/checkpoint-2" > "$2/checkpoint-2.txt"
mount -o remount,size=20m "$1"
"${@:3}" > "$2/rerun.out" 2>&1
echo "rc=$?"
cp "$1/run/result.json" "$2/result.json"
"""


def test_a_real_full_disk_while_saving_a_checkpoint(tmp_path):
    """The same on a real full disk: a 1100 KiB tmpfs holds checkpoint-2 (660 KB) but not checkpoint-4, whose
    optimizer.pt PyTorch's writer fails to write; the tmpfs is then grown and the same command resumes. Needs a user
    namespace to mount it (unshare -r -m): skipped where the system allows none."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged user namespace here (unshare -r -m) to mount a small tmpfs in")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    script = tmp_path / "full.sh"
    script.write_text(REAL_DISK_FULL)
    recipe = str(Path(load_recipe(QLORA).__file__))
    done = subprocess.run(["unshare", "-r", "-m", "bash", str(script), str(disk), str(tmp_path), sys.executable,
                           recipe, *FOUR_STEPS, "--output_dir", str(out)], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, timeout=600)
    codes = [line for line in done.stdout.splitlines() if line.startswith("rc=")]
    assert codes == ["rc=4", "rc=0"], done.stdout[-2000:] + done.stderr[-3000:]
    expected = f"{QLORA}: no space left on device in {out}: free space and rerun the same command to resume"
    assert _the_one_line(done.stderr) == expected
    cut_short = (tmp_path / "checkpoint-4.txt").read_text().split()
    assert "adapter_model.safetensors" in cut_short and SEAL_FILE not in cut_short
    assert SEAL_FILE in (tmp_path / "checkpoint-2.txt").read_text().split()
    assert "checkpoint-4 is incomplete (cut short while being saved); removed, resuming from checkpoint-2" in \
        (tmp_path / "rerun.out").read_text()
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["status"] == "ok" and record["resumed_at_step"] == 2 and record["global_step"] == 4
