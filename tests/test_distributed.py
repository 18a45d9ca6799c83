"""Recipes under `accelerate launch` with two CPU processes (DDP over gloo): both train, one record is
written by the main process, the adapter reloads, AdaLoRA reaches the same ranks in both; and the
launch-time refusals, checked in one process with the launcher's environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.errors import UserError
from harness.locations import RECIPES_DIR, REPO_ROOT

DDP_CPU = RECIPES_DIR / "configs" / "accelerate" / "ddp_cpu.yaml"


def launch(recipe: str, argv: list[str]) -> subprocess.CompletedProcess:
    """accelerate launch with the shipped two-process CPU config, one thread per process (2 cores here)."""
    from harness.models.offline import resolve_offline_model

    resolve_offline_model(argv[argv.index("--model") + 1])  # built once, not by both processes at once
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP_CPU),
               "--num_cpu_threads_per_process", "1", str(RECIPES_DIR / f"{recipe}.py"), *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)


def two_process_record(result: subprocess.CompletedProcess, out) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.count("Result written to") == 1, "only the main process speaks"
    record = json.loads((out / "result.json").read_text())
    assert record["status"] == "ok"
    launch_fields = record["distributed"]
    assert (launch_fields["processes"], launch_fields["strategy"], launch_fields["backend"]) == (2, "ddp", "gloo")
    per_process = launch_fields["per_process"]
    assert [p["process"] for p in per_process] == [0, 1]
    assert all(p["peak_memory_kind"] == "cpu_rss" and p["peak_memory_mb"] > 100 for p in per_process)
    assert record["peak_memory_mb"] == max(p["peak_memory_mb"] for p in per_process)
    # One set of final files, nothing half-staged, no second record.
    assert not list(out.glob(".staging-*")) and not (out / "last_attempt.json").exists()
    return record


def test_lora_recipe_trains_in_two_processes_and_its_adapter_reloads(recipe_argv, tmp_path):
    from peft import PeftModel

    from harness.models.loading import load_model
    from harness.models.methods import count_optimizer_steps
    from harness.run.config import ModelArguments

    out = tmp_path / "run"
    argv = recipe_argv("--r", "4", "--load_best_model_at_end", "false", "--eval_strategy", "no",
                       "--per_device_train_batch_size", "2", output_dir=out)
    record = two_process_record(launch("qwen2_5_0_5b_lora", argv), out)

    # Each optimizer step took a batch from each process: half the steps one process would take, and the
    # tokens the Trainer counted are both processes' (gathered).
    trained_rows = record["data"]["train_examples"]
    assert record["global_step"] == count_optimizer_steps(trained_rows, 2 * 2, 2, 1, -1)
    assert record["global_step"] < count_optimizer_steps(trained_rows, 2, 2, 1, -1)
    assert record["tokens_trained"] > 0 and record["train_loss"] is not None

    # The saved adapter is a trained one (LoRA's B starts at zero) and reloads onto the base.
    base = load_model(ModelArguments(model="tiny-qwen2"), "lora", False)
    reloaded = PeftModel.from_pretrained(base, out)
    lora_b = [p for name, p in reloaded.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_flagship_adalora_reaches_the_same_ranks_in_both_processes(recipe_argv, tmp_path):
    out = tmp_path / "run"
    # The recipe's own evaluation and best-checkpoint reload run too (every process scores, the main one says).
    record = two_process_record(launch("qwen2_7b_adalora", recipe_argv(output_dir=out)), out)

    adalora = record["adalora"]
    assert adalora["same_in_every_process"] is True
    # The schedule counted the steps two processes take, so pruning reached its target in them.
    assert record["global_step"] == record["planned_steps"] == adalora["schedule"]["total_step"]
    assert adalora["total_rank"] == adalora["target_budget"] < adalora["initial_budget"]
    assert len(set(adalora["ranks"].values())) > 1, "ranks should differ between modules"
    assert json.loads((out / "adalora_ranks.json").read_text())["ranks"] == adalora["ranks"]


def test_a_refusal_under_two_processes_is_said_once(recipe_argv, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = launch("qwen2_5_0_5b_lora", recipe_argv(output_dir=out))
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    said = [i for i, line in enumerate(lines) if line.startswith("qwen2_5_0_5b_lora:")]
    assert len(said) == 1 and "not empty" in lines[said[0]], result.stderr[-2000:]
    # The launcher (torch.distributed.run) reports the failed processes after it, never before it.
    assert said[0] == 0, result.stderr[-2000:]
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------- launch-time refusals, one process

@pytest.fixture
def launched(monkeypatch):
    """This process, told by the environment that it is one of two (nothing is initialised: parse the settings
    first, as parse_args would join the launch's process group)."""
    def make(strategy: str = "ddp", rank: int = 0):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true" if strategy == "fsdp" else "false")
    return make


def settings(*argv: str, recipe: str = "qwen2_5_0_5b_lora"):
    from harness.run.command_line import parse_args
    from harness.run.flow import load_recipe

    return parse_args({**load_recipe(recipe).DEFAULTS, "recipe": recipe}, ["--model", "tiny-qwen2", *argv])


@pytest.mark.parametrize("strategy, argv, recipe, expected", [
    ("ddp", ["--device_map", "auto"], "qwen2_5_0_5b_lora", "leave --device_map unset"),
    ("ddp", ["--backend", "unsloth"], "qwen2_5_0_5b_lora", "--backend peft"),
    ("fsdp", [], "qwen2_7b_adalora", "ddp.yaml"),
    ("fsdp", [], "qwen2_5_0_5b_qlora_8bit", "--quantization 4bit"),
])
def test_what_cannot_run_under_several_processes_is_refused(launched, strategy, argv, recipe, expected):
    from harness.run.distributed import check_launch

    cfg = settings(*argv, recipe=recipe)
    launched(strategy)
    with pytest.raises(UserError, match="under accelerate launch") as refused:
        check_launch(cfg)
    assert expected in str(refused.value)


def test_what_runs_under_several_processes_passes(launched):
    from harness.run.distributed import check_launch

    adalora, qlora = settings(recipe="qwen2_7b_adalora"), settings(recipe="qwen2_5_0_5b_qlora")
    launched("ddp")
    check_launch(adalora)  # AdaLoRA under DDP
    launched("fsdp")
    check_launch(qlora)  # 4-bit under FSDP (FSDP-QLoRA)


def test_adalora_spread_over_gpus_by_device_map_is_refused(monkeypatch):
    import torch

    from harness.run.distributed import check_launch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="spread over several GPUs"):
        check_launch(settings("--device_map", "auto", recipe="qwen2_7b_adalora"))
    check_launch(settings("--device_map", "auto"))  # LoRA spread by device_map is the user's choice


def test_the_number_of_processes_is_part_of_the_fingerprint(launched):
    from harness.run.folder import fingerprint_of, run_settings

    cfg = settings()
    alone = fingerprint_of(run_settings(cfg))
    launched("ddp")
    assert fingerprint_of(run_settings(cfg)) != alone


def test_only_the_main_process_prints(launched, capsys):
    from harness.run.distributed import main_speaks

    launched("ddp", rank=1)
    with main_speaks():
        print("from process 1")
    launched("ddp", rank=0)
    with main_speaks():
        print("from process 0")
    assert capsys.readouterr().out == "from process 0\n"
