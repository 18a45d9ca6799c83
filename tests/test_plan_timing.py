"""The time planner: the time model's arithmetic (harness/plan/timing.py), the plan's --json time, and the
predicted-vs-measured check of a runs.jsonl (harness/plan/time_check.py)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.locations import REPO_ROOT
from harness.plan.gpus import GPUS
from harness.plan.speeds import Calibration, load_calibration
from harness.plan.timing import (
    BANDWIDTH_FRACTION,
    LOSS_PASSES_FUSED,
    MATMUL_FRACTION,
    PER_MICRO_BATCH_OVERHEAD_S,
    PER_OP_S,
    PER_STEP_OVERHEAD_S,
    RANDOM_BYTES_PER_SECOND,
    RANGE_FACTOR,
    Speed,
    speed_from,
    step_seconds,
)
from harness.plan.work import StepWork

NOTHING = StepWork(tokens=1000, forward_flops=0, backward_flops=0, recompute_flops=0, reference_flops=0,
                   attention_flops=0, dequant_bytes=0, cast_bytes=0, weight_norm_bytes=0, optimizer_bytes=0,
                   gradient_bytes=0, score_bytes=0)
# 1 TFLOP/s, 100 GB/s, 0.1 s a step and 0.05 s a micro-batch of overhead
HAND = Speed(1e12, 1e11, 0.1, 0.05, "by hand")


def test_twice_the_flops_is_twice_the_compute_time():
    once = step_seconds(dataclasses.replace(NOTHING, forward_flops=10**12, backward_flops=2 * 10**12), HAND)
    twice = step_seconds(dataclasses.replace(NOTHING, forward_flops=2 * 10**12, backward_flops=4 * 10**12), HAND)
    assert once.compute_seconds == pytest.approx(3.0) and twice.compute_seconds == pytest.approx(6.0)
    assert once.memory_seconds == 0 and once.overhead_seconds == pytest.approx(0.15)
    assert once.seconds == pytest.approx(3.15) and twice.seconds == pytest.approx(6.15)  # about twice: + overhead
    assert once.tokens_per_second == pytest.approx(1000 / 3.15)


def test_bytes_only_work_is_memory_time_and_the_phases_add_up():
    work = dataclasses.replace(NOTHING, optimizer_bytes=2 * 10**11, dequant_bytes=10**11)
    estimate = step_seconds(work, HAND, micro_batches=4)
    assert estimate.compute_seconds == 0 and estimate.memory_seconds == pytest.approx(3.0)
    assert estimate.overhead_seconds == pytest.approx(0.1 + 4 * 0.05)  # one step, four micro-batches
    # a sum, not a roofline's max: the bytes counted are phases of their own (optimizer step, dequantization)
    both = step_seconds(dataclasses.replace(work, forward_flops=10**12), HAND, micro_batches=4)
    assert both.seconds == pytest.approx(1.0 + 3.0 + 0.3)


def test_the_range_is_the_named_factor_either_side():
    estimate = step_seconds(dataclasses.replace(NOTHING, forward_flops=10**12), HAND)
    assert estimate.low == pytest.approx(estimate.seconds / RANGE_FACTOR)
    assert estimate.high == pytest.approx(estimate.seconds * RANGE_FACTOR)
    assert estimate.to_dict()["step_seconds_low"] < estimate.seconds < estimate.to_dict()["step_seconds_high"]
    with pytest.raises(ValueError):
        step_seconds(NOTHING, HAND, micro_batches=0)


def test_speed_from_the_data_sheet_or_a_calibration():
    t4, a100 = GPUS["T4"].speed, GPUS["A100-80"].speed
    sheet = speed_from(t4, None, "bfloat16", "cuda")  # a T4 has no bf16: it trains 16-bit in fp16
    assert sheet.matmul_flops_per_second == pytest.approx(65e12 * MATMUL_FRACTION)
    assert sheet.bandwidth_bytes_per_second == pytest.approx(320e9 * BANDWIDTH_FRACTION)
    assert sheet.step_overhead_seconds == PER_STEP_OVERHEAD_S["cuda"] and "data sheet" in sheet.source
    measured = Calibration("NVIDIA A100-SXM4-80GB", "bfloat16", 200e12, 1.8e12, None, Path("calibration-a100-80.json"))
    used = speed_from(a100, measured, "bfloat16", "cuda")  # a calibration's figures are used as measured
    assert (used.matmul_flops_per_second, used.bandwidth_bytes_per_second) == (200e12, 1.8e12)
    assert "calibration-a100-80.json" in used.source
    fp32 = speed_from(a100, measured, "float32", "cuda")  # another dtype: the data sheet's ratio of the two
    assert fp32.matmul_flops_per_second == pytest.approx(200e12 * 19.5 / 312)


def test_skinny_products_run_at_the_calibrations_skinny_rate(tmp_path):
    path = tmp_path / "calibration-cpu-fake-cpu.json"
    rows = [{"role": "training", "flops_per_second": {"median": 200e9}},
            {"role": "skinny", "flops_per_second": {"median": 50e9}}]

    def calibration(matmul: list) -> Calibration:  # read as the planner reads a calibration file
        path.write_text(json.dumps({
            "schema": 1, "mode": "full", "dtype": "float32", "device": {"kind": "cpu", "name": "Fake CPU"},
            "provenance": {"threads": 1}, "matmul": matmul,
            "achievable": {"matmul_flops_per_second": 200e9, "bandwidth_bytes_per_second": 10e9}}), encoding="utf-8")
        return load_calibration("cpu Fake CPU", tmp_path)

    speed = speed_from(None, calibration(rows), "float32", "cpu")
    assert speed.skinny_flops_per_second == 50e9 and speed.op_seconds == PER_OP_S["cpu"]
    work = dataclasses.replace(NOTHING, forward_flops=10**12, skinny_flops=2 * 10**11)
    assert step_seconds(work, speed).compute_seconds == pytest.approx(8e11 / 200e9 + 2e11 / 50e9)
    plain = speed_from(None, calibration(rows[:1]), "float32", "cpu")  # an older file: no skinny row
    assert plain.skinny_flops_per_second is None
    assert step_seconds(work, plain).compute_seconds == pytest.approx(1e12 / 200e9)


def test_ops_random_numbers_and_elementwise_bytes_take_their_time():
    speed = dataclasses.replace(HAND, op_seconds=1e-5, optimizer_op_seconds=2e-6, random_bytes_per_second=1e9)
    work = dataclasses.replace(NOTHING, ops=1000, optimizer_ops=500, elementwise_bytes=10**11, random_bytes=10**9)
    estimate = step_seconds(work, speed)
    assert estimate.overhead_seconds == pytest.approx(0.15 + 1000 * 1e-5 + 500 * 2e-6)
    assert estimate.memory_seconds == pytest.approx(1.0 + 1.0)  # element-wise at the bandwidth, random at 1 GB/s
    assert step_seconds(work, dataclasses.replace(speed, random_bytes_per_second=None)).memory_seconds == (
        pytest.approx(1.01))
    gpu = speed_from(GPUS["A100-80"].speed, None, "bfloat16", "cuda")
    cpu = speed_from(None, Calibration("Fake CPU", "float32", 1e11, 1e10, 1, Path("/none/calibration-x.json")),
                     "float32", "cpu")
    assert gpu.op_seconds == PER_OP_S["cuda"] and gpu.optimizer_op_seconds == 0  # foreach: in the step's overhead
    assert cpu.optimizer_op_seconds == cpu.op_seconds == PER_OP_S["cpu"]
    assert (gpu.random_bytes_per_second, cpu.random_bytes_per_second) == (None, RANDOM_BYTES_PER_SECOND["cpu"])


def _plan(*argv: str):
    return subprocess.run([sys.executable, "-m", "harness.plan", "recipes/qwen2_5_0_5b_lora.py", "--model",
                           "stories260k", "--max_seq_length", "64", *argv, "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def test_json_carries_the_step_time_on_a_named_gpu_and_none_for_a_size():
    done = _plan("--gpu", "A100-80")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)["plans"][0]
    speed = GPUS["A100-80"].speed
    assert plan["compute_seconds"] == pytest.approx(plan["step_flops"] / (speed.bf16 * MATMUL_FRACTION))
    # on a GPU the loss's bytes are TRL's Triton kernels' passes over the logits, not the torch ops counted
    work = plan["step_work"]
    moved = plan["step_bytes"] - work["loss_bytes"] + LOSS_PASSES_FUSED["cuda"] * work["logits_bytes"]
    assert work["loss_bytes"] > LOSS_PASSES_FUSED["cuda"] * work["logits_bytes"] > 0
    assert plan["memory_seconds"] == pytest.approx(moved / (speed.bandwidth * BANDWIDTH_FRACTION))
    assert plan["step_seconds"] > plan["compute_seconds"] + plan["memory_seconds"]  # + the overheads
    assert plan["tokens_per_second"] == pytest.approx(plan["step_tokens"] / plan["step_seconds"])
    assert plan["step_seconds_low"] < plan["step_seconds"] < plan["step_seconds_high"]

    sized = _plan("--gpu", "16")  # a size: the memory plan stands, the time is absent with its reason
    assert sized.returncode == 0, sized.stderr
    plan = json.loads(sized.stdout)["plans"][0]
    assert plan["planned_peak_bytes"] > 0 and plan["step_seconds"] is None and plan["tokens_per_second"] is None
    assert plan["time_reason"].startswith("--gpu 16: a size has no speed; name the GPU")
    assert "\n" not in plan["time_reason"]


# ---------------------------------------------------------------------------- time_check

def _record(trial: str, device: str, seconds: float, steps: int = 4, objective: str = "sft") -> dict:
    """A trial record shaped as harness.bench writes one (results/runs.jsonl), of a run that trained nothing."""
    from harness.run.command_line import parse_args

    config = parse_args({}, ["--model", "stories260k", "--output_dir", "unused", "--max_seq_length", "32",
                             "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                             "--max_steps", str(steps), "--optim", "adamw_torch"]).to_dict()
    config["objective"] = objective
    return {"schema": 1, "sweep": "synthetic", "trial_id": trial, "trial_hash": trial, "status": "ok",
            "recipe": "qwen2_5_0_5b_lora", "method": "lora", "model": "stories260k", "rank": 8, "seed": 42,
            "cpu_threads": 2, "result": {"status": "ok", "device": device, "train_seconds": seconds,
                                         "global_step": steps, "tokens_per_second": 100.0, "config": config}}


def _fake_calibration(folder: Path, name: str = "Fake CPU") -> Path:
    """A CPU so fast that a step of stories260k is its overheads alone: the prediction is known by hand."""
    path = folder / "calibration-cpu-fake-cpu.json"
    path.write_text(json.dumps({
        "schema": 1, "mode": "small", "dtype": "float32", "device": {"kind": "cpu", "name": name},
        "provenance": {"threads": 2}, "achievable": {"matmul_flops_per_second": 1e20,
                                                     "bandwidth_bytes_per_second": 1e20}}), encoding="utf-8")
    return path


def test_time_check_predicts_each_trial_and_lists_what_it_cannot(tmp_path):
    import torch

    from harness.plan.architectures import model_config
    from harness.plan.time_check import main, run_config
    from harness.plan.work import step_work

    work = step_work(run_config(_record("any", "", 1.0)["result"]["config"]), model_config("stories260k"),
                     torch.float32)  # a CPU run's matmuls: float32
    # 2 micro-batches a step, and every op dispatched (the optimizer's too, one tensor at a time on a CPU)
    step = (PER_STEP_OVERHEAD_S["cpu"] + 2 * PER_MICRO_BATCH_OVERHEAD_S["cpu"]
            + (work.ops + work.optimizer_ops) * PER_OP_S["cpu"] + work.random_bytes / RANDOM_BYTES_PER_SECOND["cpu"])
    runs = tmp_path / "runs.jsonl"
    records = [_record("hit", "cpu Fake CPU (2 cores)", 4 * step), _record("miss", "cpu Fake CPU (2 cores)", 8 * step),
               _record("grpo", "cpu Fake CPU (2 cores)", 1.0, objective="grpo"),
               _record("elsewhere", "cpu Other CPU (2 cores)", 1.0)]
    runs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    out = tmp_path / "table.md"
    assert main(["--runs", str(runs), "--calibration", str(_fake_calibration(tmp_path)), "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "**Within ±25%**: 1 of 2 predicted trials (50%)" in text
    assert f"| 4 | {4 * step:.1f} | {4 * step:.1f} ({4 * step / 1.25:.1f}-{5 * step:.1f}) | +0% | yes |" in text
    assert f"| 4 | {8 * step:.1f} | {4 * step:.1f} (" in text and "| -50% | no |" in text
    assert "- synthetic/grpo (cpu Fake CPU (2 cores)): GRPO: the generation of completions is not modelled" in text
    assert ("- synthetic/elsewhere (cpu Other CPU (2 cores)): not comparable: it ran on cpu Other CPU (2 cores), "
            "the calibration is of Fake CPU") in text


def test_time_check_refuses_a_missing_runs_file_in_one_line(tmp_path, capsys):
    from harness.plan.time_check import main

    with pytest.raises(SystemExit) as exit_:
        main(["--runs", str(tmp_path / "none.jsonl")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"time_check: --runs {tmp_path / 'none.jsonl'}: no such file")
