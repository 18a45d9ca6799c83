"""Predicted beside measured train time: the CPU table of `python -m harness.plan.time_check` (harness/plan/
time_check.py) and the "predicted train (s)" column of the benchmark tables (harness/reporting/page.py).

The trials are real records of results/runs.jsonl (the stories260k sweep), moved onto a made-up CPU whose
calibration the test writes, so that what the table says can be recomputed here from the same inputs."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from harness.locations import REPO_ROOT

DEVICE = "cpu Test CPU (2 cores)"
TRIALS = ("qwen2_7b_qlora-r4-s42", "qwen2_7b_adalora-r4-s42")


def _real_records(device: str = DEVICE) -> list[dict]:
    """Two stories260k trials from results/runs.jsonl (1 CPU thread each), moved onto `device`."""
    lines = (REPO_ROOT / "results" / "runs.jsonl").read_text(encoding="utf-8").splitlines()
    records = {r["trial_id"]: r for r in map(json.loads, lines) if r.get("sweep") == "stories260k"}
    moved = []
    for trial in TRIALS:
        record = copy.deepcopy(records[trial])
        record["result"]["device"] = device
        moved.append(record)
    return moved


def _calibration(folder: Path, threads: int = 1) -> Path:
    """A calibration of the Test CPU, named as calibrate names it (harness.plan.speeds finds it by the device)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "calibration-cpu-test-cpu.json"
    path.write_text(json.dumps({
        "schema": 1, "mode": "small", "dtype": "float32", "device": {"kind": "cpu", "name": "Test CPU"},
        "provenance": {"threads": threads, "date": "2026-12-03T00:00:00+00:00", "commit": "abc123",
                       "command": "python -m harness.plan.calibrate --small --device cpu --threads 1"},
        "achievable": {"matmul_flops_per_second": 2e9, "bandwidth_bytes_per_second": 1e9}}), encoding="utf-8")
    return path


def _expected(record: dict, folder: Path):
    """The prediction recomputed from the same inputs: step_work x the calibration's speed x the trial's steps."""
    import torch

    from harness.plan.architectures import model_config
    from harness.plan.batches import data_lengths, run_batch
    from harness.plan.speeds import load_calibration
    from harness.plan.time_check import run_config
    from harness.plan.timing import speed_from, step_seconds
    from harness.plan.work import step_work

    cfg = run_config(record["result"]["config"])
    # at the trial's rows' real lengths (its data file and tokenizer are here), a CPU run's matmuls in float32
    batch = run_batch(cfg, data_lengths(cfg)[0])
    work = step_work(cfg, model_config(cfg.model.model), torch.float32, batch=batch)
    speed = speed_from(None, load_calibration(DEVICE, folder), "float32", "cpu", record["cpu_threads"])
    estimate = step_seconds(work, speed, micro_batches=cfg.train.gradient_accumulation_steps)
    steps = record["result"]["global_step"]
    return estimate, estimate.seconds * steps


def _write_runs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_table_predicts_each_trial_from_its_own_settings_and_sets_another_cpu_apart(tmp_path):
    from harness.plan.time_check import main

    calibration = _calibration(tmp_path / "gpu")
    elsewhere = _real_records("cpu Other CPU (2 cores)")[0]
    elsewhere["trial_id"] = "elsewhere"
    runs = _write_runs(tmp_path / "runs.jsonl", [*_real_records(), elsewhere])
    out = tmp_path / "table.md"
    assert main(["--runs", str(runs), "--calibration", str(calibration), "--output", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert f"python -m harness.plan.time_check --runs {runs} --calibration {calibration} --output {out}" in text
    assert "python -m harness.bench --ranks 4,8,16,32 --model stories260k" in text  # the trials' own command
    assert "matmul 2.0 GFLOP/s (step-weighted), bandwidth 1.0 GB/s" in text and "threads 1" in text
    assert "`stories260k` (karpathy/llama2.c stories260K" in text  # the model and what its weights are
    for record in _real_records():
        estimate, predicted = _expected(record, tmp_path / "gpu")
        measured = record["result"]["train_seconds"]
        steps = record["result"]["global_step"]
        error = predicted / measured - 1
        parts = [part / estimate.seconds for part in (estimate.compute_seconds, estimate.memory_seconds,
                                                       estimate.overhead_seconds)]
        row = (f"| stories260k | {record['recipe']} | {record['method']} | 4 | 42 | 1 | {steps} | {measured:.1f} | "
               f"{predicted:.1f} ({predicted / 1.25:.1f}-{predicted * 1.25:.1f}) | {error:+.0%} | "
               f"{'yes' if abs(error) <= 0.25 else 'no'} | " + " | ".join(f"{p:.0%}" for p in parts) + " |")
        assert row in text
    assert "## Not comparable\n\n- stories260k/elsewhere (cpu Other CPU (2 cores)): not comparable: it ran on" in text
    assert "| stories260k | elsewhere" not in text and "Not comparable** (another device" in text
    with pytest.raises(SystemExit) as refused:  # the table is written whole, and not over an earlier one
        main(["--runs", str(runs), "--calibration", str(calibration), "--output", str(out)])
    assert refused.value.code == 2


def test_dpo_is_predicted_with_its_reference_and_grpo_is_listed_with_its_generation(tmp_path):
    from harness.plan.time_check import predict

    calibration_folder = tmp_path / "gpu"
    _calibration(calibration_folder)
    rows = {}
    for name in ("smollm2-135m_dpo", "smollm2-135m_grpo"):
        result = json.loads((REPO_ROOT / "results" / name / "result.json").read_text(encoding="utf-8"))
        # the committed run's settings, on stories260k at a shorter length: the same count, in a fraction of the time
        result["device"] = DEVICE
        result["config"].update(model="stories260k", max_seq_length=64, max_length=128)
        rows[name] = predict({"sweep": name, "trial_id": "result.json", "status": "ok", "result": result},
                             folder=calibration_folder, calibrated_only=True)
        result["config"]["precompute_ref_log_probs"] = True  # the reference's forward done once, before training
        rows[name + " precomputed"] = predict({"status": "ok", "result": result}, folder=calibration_folder,
                                              calibrated_only=True)
    dpo = rows["smollm2-135m_dpo"]
    assert dpo["steps"] == 20 and dpo["predicted"] > rows["smollm2-135m_dpo precomputed"]["predicted"] > 0
    assert "the run's CPU threads were not recorded (calibrated with 1)" in dpo["notes"]
    assert rows["smollm2-135m_grpo"]["reason"] == "GRPO: the generation of completions is not modelled"


def test_the_report_puts_predicted_beside_measured_with_a_calibration_and_says_why_not_without(tmp_path):
    from harness.reporting.page import render
    from harness.reporting.tables import PREDICTED_TRAIN

    records = _real_records()
    _calibration(tmp_path / "gpu")
    (tmp_path / "none").mkdir()
    with_speed = render("stories260k", records, [], calibrations=tmp_path / "gpu")
    header = next(line for line in with_speed.splitlines() if line.startswith("| recipe"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells.index(PREDICTED_TRAIN) == cells.index("train (s)") + 1
    for record in records:
        _, predicted = _expected(record, tmp_path / "gpu")
        row = next(line for line in with_speed.splitlines() if line.startswith(f"| {record['recipe']} "))
        values = [c.strip() for c in row.strip("|").split("|")]
        assert values[cells.index(PREDICTED_TRAIN)] == f"{predicted:.2f}"
        assert values[cells.index("train (s)")] == f"{record['result']['train_seconds']:.2f}"
    assert "speed from calibration calibration-cpu-test-cpu.json" in with_speed

    without = render("stories260k", records, [], calibrations=tmp_path / "none")
    header = next(line for line in without.splitlines() if line.startswith("| recipe"))
    assert "train (s)" in header and PREDICTED_TRAIN not in header  # nothing predicted: no column of blanks, never 0s
    assert (f"*{PREDICTED_TRAIN}* not shown for {TRIALS[0]}, {TRIALS[1]}: no calibration of Test CPU "
            "(calibration-cpu-test-cpu.json); run python -m harness.plan.calibrate on that device.") in without


@pytest.mark.parametrize("problem", ["missing-runs", "result-not-a-run", "calibration-schema", "report-folder"])
def test_refusals_are_one_line(tmp_path, capsys, problem):
    from harness.plan.time_check import main as time_check
    from harness.reporting.page import main as report

    runs = _write_runs(tmp_path / "runs.jsonl", _real_records())
    not_a_run = tmp_path / "result.json"
    not_a_run.write_text(json.dumps({"hello": 1}), encoding="utf-8")
    stale = _calibration(tmp_path / "old")
    stale.write_text(json.dumps({**json.loads(stale.read_text(encoding="utf-8")), "schema": 99}), encoding="utf-8")
    program, argv, said = {
        "missing-runs": (time_check, ["--runs", str(tmp_path / "none.jsonl")], "no such file"),
        "result-not-a-run": (time_check, ["--runs", str(runs), "--result", str(not_a_run)],
                             "not a run's result.json"),
        "calibration-schema": (time_check, ["--runs", str(runs), "--calibration", str(stale)],
                               "not a calibration of schema 1"),
        "report-folder": (report, ["--results-dir", str(tmp_path), "--calibrations", str(tmp_path / "nowhere")],
                          "--calibrations"),
    }[problem]
    with pytest.raises(SystemExit) as refused:
        program(argv)
    assert refused.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err
