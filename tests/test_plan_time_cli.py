"""How long will it take, as the user reads it: `python -m harness.plan`'s time columns and a recipe's whole run
(harness.plan.run_time: steps from the data, evaluations, a range, the cost), and the time in the plan line a
recipe prints before it loads anything. Plans and step counts run on the meta device: nothing trains."""
from __future__ import annotations

import json
import math

import pytest

from harness.locations import REPO_ROOT
from harness.plan import run_time, speeds
from harness.plan.cli import main as plan_main
from harness.plan.timing import RANDOM_BYTES_PER_SECOND, RANGE_FACTOR

RECIPE = str(REPO_ROOT / "recipes" / "qwen2_5_0_5b_lora.py")


def _rows(path, n: int):
    path.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(n)]))
    return path


def _cpu_calibration(folder):
    """A minimal valid calibration of this machine's CPU (the figures need not be this CPU's: only read back)."""
    from harness.plan.speeds import calibration_path

    path = calibration_path("cpu", folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema": 1, "dtype": "float32", "device": {"kind": "cpu", "name": "this test's CPU"},
        "achievable": {"matmul_flops_per_second": 5e10, "bandwidth_bytes_per_second": 5e9},
        "provenance": {"threads": 1}}))
    return path


def _plan(capsys, *argv) -> str:
    assert plan_main(list(argv)) == 0
    return capsys.readouterr().out


# --- the arithmetic, without torch ---------------------------------------------------------------------------

def test_evaluations_follow_the_strategy_and_count_the_final_one_once():
    # every 50 steps over 171: at 50, 100, 150, then the final evaluation after step 171
    assert run_time.evaluation_passes(171, 57, "steps", 50, 10, False) == 4
    assert run_time.evaluation_passes(150, 50, "steps", 50, 10, False) == 3  # step 150 evaluated: no extra final
    assert run_time.evaluation_passes(150, 50, "steps", 50, 10, True) == 4  # + one before training
    assert run_time.evaluation_passes(100, 50, "steps", 0.25, 10, False) == 4  # a fraction of the run: every 25
    assert run_time.evaluation_passes(100, 50, "steps", None, 10, False) == 10  # unset: logging_steps
    assert run_time.evaluation_passes(120, 40, "epoch", None, 10, False) == 3
    assert run_time.evaluation_passes(120, 40, "no", None, 10, False) == 1  # the recipes' final evaluation only


def test_durations_and_prices_read_as_ranges_in_one_unit():
    assert run_time.duration_range(720, 1140) == "12-19 min"
    assert run_time.duration_range(2.5, 3.9) == "2.5-3.9 s"
    assert run_time.duration_range(3600, 7200) == "1-2 h"
    assert run_time.usd(3600, 7200, 0.8) == (0.8, 1.6)
    for bad in ("-1", "nan", "inf", "-inf", "cheap"):
        with pytest.raises(Exception, match="pass|is not"):
            run_time.check_price(bad)
    assert run_time.check_price("0") == 0.0


# --- python -m harness.plan ----------------------------------------------------------------------------------

def test_the_table_has_step_time_and_tokens_per_second_on_a_listed_gpu(capsys):
    out = _plan(capsys, "--model", "tiny-qwen2", "--ranks", "8", "--gpu", "H200", "--usd_per_hour", "4")
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert "step (s)" in header and "tokens/s" in header and "$ per 1,000 steps" in header
    lora = next(line for line in out.splitlines() if line.startswith("| LoRA "))
    step, tokens = [cell.strip() for cell in lora.split("|")[-4:-2]]
    low, high = (float(x) for x in step.split("-"))
    assert 0 < low < high and high / low == pytest.approx(RANGE_FACTOR**2, rel=0.02)
    assert float(tokens.split("-")[0].replace(",", "")) > 0
    assert "Time on H200, bfloat16 (estimate; how close: results/time_check.md, results/time_vs_published.md)" in out


def test_a_size_has_no_time_and_says_why_never_zero(capsys):
    out = _plan(capsys, "--model", "tiny-qwen2", "--ranks", "8", "--gpu", "16", "--usd_per_hour", "1")
    header = next(line for line in out.splitlines() if line.startswith("| method"))
    assert "step (s)" not in header and "tokens/s" not in header
    assert "Time: not known (--gpu 16: a size has no speed; name the GPU" in out
    assert "Cost: not known" in out
    data = json.loads(_plan(capsys, RECIPE, "--model", "tiny-qwen2", "--gpu", "16", "--json", "--usd_per_hour", "1"))
    plan = data["plans"][0]
    assert plan["step_seconds"] is None and plan["tokens_per_second"] is None and "a size" in plan["time_reason"]
    assert plan["usd"] is None and "not known" in plan["usd_reason"] and plan["step_flops"] > 0
    assert "run_seconds" not in plan


def test_a_recipe_run_is_its_steps_from_the_data_plus_its_evaluations(tmp_path, capsys):
    data = _rows(tmp_path / "rows.json", 37)
    settings = ["--model", "tiny-qwen2", "--data_file", str(data), "--validation_split", "0.2",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "3", "--num_train_epochs", "2",
                "--eval_steps", "4", "--save_steps", "8", "--per_device_eval_batch_size", "4", "--gpu", "H200", "--json"]

    def plan(price: str) -> dict:
        return json.loads(_plan(capsys, RECIPE, *settings, "--usd_per_hour", price))["plans"][0]

    got = plan("2")
    # By hand: 37 rows, ceil(0.2 x 37) = 8 held out, 29 train; ceil(29 / 2) = 15 batches, 15 / 3 = 5 steps an
    # epoch, 2 epochs = 10 steps; evaluations at steps 4 and 8, then the final one after step 10: 3.
    assert (got["train_rows"], got["eval_rows"], got["steps_per_epoch"], got["steps"]) == (29, 8, 5, 10)
    assert got["eval_passes"] == 3
    # One evaluation: ceil(8 / 4) = 2 eval batches, each (step / 3 micro-batches) x (4 / 2 rows) x the forward share
    share = got["step_work"]["forward_flops"] / got["step_flops"]
    assert 0 < share < 1
    assert got["eval_pass_seconds"] == pytest.approx(2 * got["step_seconds"] / 3 * 2 * share)
    run = got["run_seconds"]
    assert run["estimate"] == pytest.approx(10 * got["step_seconds"] + 3 * got["eval_pass_seconds"])
    assert (run["low"], run["high"]) == pytest.approx((run["estimate"] / RANGE_FACTOR, run["estimate"] * RANGE_FACTOR))
    assert got["usd"]["low"] == pytest.approx(run["low"] / 3600 * 2) and got["usd"]["for"] == "the run"
    doubled = plan("4")
    assert doubled["usd"]["low"] == pytest.approx(2 * got["usd"]["low"])
    assert doubled["usd"]["high"] == pytest.approx(2 * got["usd"]["high"])

    text = _plan(capsys, RECIPE, *settings[:-1], "--usd_per_hour", "2")
    assert "The run: 10 optimizer steps (29 training rows of" in text and "+ 3 evaluations of 8 rows" in text
    assert "at $2/h: $" in text


def test_a_hub_dataset_gives_the_time_per_thousand_steps(capsys):
    out = _plan(capsys, RECIPE, "--model", "tiny-qwen2", "--dataset_name", "someone/not-downloaded", "--gpu", "T4")
    assert "The run's steps are not known (Hub dataset someone/not-downloaded" in out
    assert "per 1,000 optimizer steps" in out


def test_this_cpu_is_timed_from_its_calibration_or_says_how_to_get_one(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "none"))
    out = _plan(capsys, RECIPE, "--model", "tiny-qwen2", "--max_steps", "7")
    assert "no calibration of this machine's CPU" in out and "python -m harness.plan.calibrate" in out
    _cpu_calibration(tmp_path / "cal")
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "cal"))
    out = _plan(capsys, RECIPE, "--model", "tiny-qwen2", "--max_steps", "7")
    assert "Time on this machine's CPU, float32 (estimate; how close: results/time_check.md, results/time_vs_published.md)" in out and "The run: 7 optimizer steps" in out
    timed = json.loads(_plan(capsys, RECIPE, "--model", "tiny-qwen2", "--max_steps", "7", "--json"))["plans"][0]
    # the plan in bfloat16 (--dtype auto plans a GPU's), the time of this CPU's float32 step: its own count
    timed_work = timed["time_step_work"]
    assert timed["compute_dtype"] == "bfloat16" and timed_work["step_bytes"] != timed["step_bytes"]
    random = timed_work["step_work"]["random_bytes"]
    assert timed["memory_seconds"] == pytest.approx(  # the calibration's 5e9 bytes/s, of the float32 step's bytes
        (timed_work["step_bytes"] - random) / 5e9 + random / RANDOM_BYTES_PER_SECOND["cpu"])
    assert timed["steps"] == 7 and timed["eval_passes"] == 1  # no evaluation in 7 steps: the final one
    assert timed["run_seconds"]["estimate"] == pytest.approx(7 * timed["step_seconds"] + timed["eval_pass_seconds"])


def test_a_bad_price_is_refused_in_one_line(capsys):
    for bad in ("-1", "nan", "inf", "free"):
        with pytest.raises(SystemExit) as stop:
            plan_main(["--model", "tiny-qwen2", "--usd_per_hour", bad])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("plan: argument --usd_per_hour:") and "e.g. --usd_per_hour 0.8" in err[0]


# --- the line a recipe prints before it loads anything --------------------------------------------------------

def _recipe_run(tmp_path):
    from harness.bench.grid import load_defaults
    from harness.run.command_line import parse_args
    from harness.run.flow import preflight

    data = _rows(tmp_path / "rows.json", 23)
    cfg = parse_args(load_defaults("qwen2_5_0_5b_lora", REPO_ROOT / "recipes" / "qwen2_5_0_5b_lora.py"),
                     ["--model", "tiny-qwen2", "--output_dir", str(tmp_path / "out"), "--data_file", str(data),
                      "--validation_split", "0", "--per_device_train_batch_size", "2",
                      "--gradient_accumulation_steps", "2", "--num_train_epochs", "1"])
    return cfg, preflight(cfg, output_dir=False)


def test_the_recipe_plan_line_carries_the_time_with_a_cpu_calibration_and_not_without(tmp_path, monkeypatch, capsys):
    import torch

    from harness.plan.preflight import check_memory_plan

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg, workload = _recipe_run(tmp_path)
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "none"))
    record = check_memory_plan(cfg, workload.targs, workload)
    line = capsys.readouterr().out
    assert line.startswith("Memory plan: ") and "predicted" not in line
    assert "time: not known (no calibration of this CPU: python -m harness.plan.calibrate)" in line
    assert record["time_plan"]["status"] == "not_known"

    _cpu_calibration(tmp_path / "cal")
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "cal"))
    record = check_memory_plan(cfg, workload.targs, workload)
    line = capsys.readouterr().out
    # 23 rows, no validation: ceil(23 / 2) = 12 batches, 12 / 2 = 6 steps, 1 epoch
    assert (f"(6 steps, every row at {cfg.data.max_seq_length:,} tokens) on this machine's CPU (estimate; how close: results/time_check.md, "
            "results/time_vs_published.md). Breakdown:") in line
    timed = record["time_plan"]
    assert timed["steps"] == 6 and timed["eval_passes"] == 0
    low, high = (float(x) for x in line.split("predicted at most ")[1].split(" ")[0].split("-"))
    assert 0 < low < high and math.isclose(high / low, RANGE_FACTOR**2, rel_tol=0.15)  # the printed figures round


def test_the_estimate_behind_the_recipe_line_is_steps_times_step_time(tmp_path, monkeypatch):
    import torch

    from harness.plan.architectures import model_config
    from harness.plan.preflight import planned_time

    cfg, workload = _recipe_run(tmp_path)
    _cpu_calibration(tmp_path / "cal")
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "cal"))
    text, record = planned_time(cfg, model_config("tiny-qwen2"), torch.float32, False, workload)
    assert record["run_seconds"]["estimate"] == pytest.approx(6 * record["step_seconds"]["step_seconds"])
    assert record["step_seconds"]["speed_source"].startswith("calibration calibration-cpu-")
    # without the Workload (no rows): the time of 1,000 steps
    text, record = planned_time(cfg, model_config("tiny-qwen2"), torch.float32, False)
    assert "per 1,000 optimizer steps" in text and record["steps"] is None
