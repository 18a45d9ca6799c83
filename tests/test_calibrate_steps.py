"""The calibration's training-step grid (harness/plan/calibrate_steps.py): its CPU small mode run as the command
runs it, a point's fault recorded while the others run, the time budget, and what the planner reads back of it
(harness.plan.speeds.load_calibration). Nothing here depends on how fast this machine is beyond "positive"."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from harness.plan import calibrate_steps
from harness.plan.calibrate import main as calibrate_main
from harness.plan.calibrate_steps import GPU_GRID, SMALL, SMALL_GRID, TIMED_STEPS, WARM_UP_STEPS, run_grid
from harness.plan.speeds import load_calibration, method_kind
from harness.plan.timing import Speed


def test_the_small_command_trains_every_point_and_sets_it_beside_the_plan(tmp_path, capsys):
    """The command as the tests run it on the CPU (in this process: its imports are already paid for)."""
    out = tmp_path / "calibrations"
    assert calibrate_main(["--small", "--device", "cpu", "--repeats", "3", "--output", str(out)]) == 0
    assert "step grid: LoRA r8: " in capsys.readouterr().out
    [path] = out.glob("calibration-cpu-*.json")
    record = json.loads(path.read_text())
    grid = record["step_grid"]
    assert grid["weights"] == "random-init" and grid["mode"] == "small" and grid["dtype"] == "float32"
    assert grid["context_bytes"] is None and 0 < grid["seconds"] <= grid["budget_seconds"]
    steps = record["steps"]
    assert [row["name"] for row in steps] == [point["name"] for point in SMALL_GRID]
    assert {row["rows"] for row in steps} == {"full", "padded", "packed"}
    for row in steps:
        assert row["status"] == "measured" and row["weights"] == "random-init", row
        seconds = row["step_seconds"]
        assert len(seconds["all"]) == TIMED_STEPS["small"] and len(row["warm_up_seconds"]) == WARM_UP_STEPS["small"]
        assert all(s > 0 for s in seconds["all"]) and seconds["median"] == statistics.median(seconds["all"])
        assert row["tokens_per_second"] == pytest.approx(row["real_tokens"] / seconds["median"])
        assert row["peak_allocated_bytes"] is None  # a CPU has no peak counter: not known, never 0
        assert row["planned_peak_bytes"] > 0 and row["planned_context_bytes"] == 0  # a CPU has no CUDA context
        assert row["predicted_step_seconds"]["data sheet"] is None  # a CPU has no data sheet
        predicted = row["predicted_step_seconds"]["calibration"]
        assert predicted > 0
        assert row["measured_over_predicted"]["calibration"] == pytest.approx(seconds["median"] / predicted)
    by_rows = {row["rows"]: row for row in steps}
    # Half of each padded row is padding; packing lays the same kind of examples end to end: nothing computed twice.
    assert by_rows["padded"]["computed_tokens"] == 2 * by_rows["padded"]["real_tokens"]
    packed = by_rows["packed"]
    assert packed["computed_tokens"] == packed["real_tokens"] == packed["planned_tokens"]
    assert [row["kind"] for row in steps] == ["lora", "full", "lora-4bit"]

    page = path.with_suffix(".md").read_text()
    assert "## Training steps (random-init weights, small grid)" in page
    assert all(f"| {point['name']} |" in page for point in SMALL_GRID)

    # The tiny shapes check the code path; the planner takes none of their figures for its constants.
    calibration = load_calibration(f"cpu {record['device']['name']}", out)
    assert (calibration.time_ratios, calibration.context_bytes, calibration.allocator_ratio) == (None, None, None)


def _speeds() -> dict:
    return {"data sheet": None, "calibration": Speed(1e10, 1e10, 0.0, 0.0, "test")}


def test_a_point_that_fails_or_runs_out_of_memory_is_recorded_and_the_others_still_run(monkeypatch, capsys):
    good = SMALL_GRID[1]  # full fine-tuning, padded rows: the fastest point
    impossible = {**good, "name": "impossible shape", "config": {"intermediate_size": -1}}
    starved = {**good, "name": "out of memory"}
    build = calibrate_steps._random_init_model

    def running_out_for_one(torch_, cfg, config, where):
        if config.intermediate_size == 127:  # the starved point's mark
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return build(torch_, cfg, config, where)

    starved["config"] = {"intermediate_size": 127}
    monkeypatch.setattr(calibrate_steps, "_random_init_model", running_out_for_one)
    rows, grid = run_grid(torch, torch.device("cpu"), [impossible, starved, good], "small", _speeds(), lambda: None)
    assert [row["status"] for row in rows] == ["failed", "out of memory", "measured"]
    assert rows[0]["reason"].startswith("RuntimeError: ") and "negative dimension" in rows[0]["reason"]
    assert rows[0]["plan_problem"] and rows[0]["planned_peak_bytes"] is None  # the planner cannot plan it either
    assert rows[1]["reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert rows[1]["planned_peak_bytes"] > 0  # planned all the same: the plan is what an OOM is compared with
    assert rows[2]["step_seconds"]["median"] > 0 and rows[2]["predicted_step_seconds"]["calibration"] > 0
    printed = capsys.readouterr().out
    assert "step grid: impossible shape: failed (RuntimeError" in printed and "step grid: full fine-tuning" in printed


def test_points_the_time_budget_leaves_no_room_for_are_skipped_and_said_so(monkeypatch):
    monkeypatch.setitem(calibrate_steps.MIN_POINT_S, "small", calibrate_steps.GRID_BUDGET_S["small"] + 1)
    rows, _ = run_grid(torch, torch.device("cpu"), SMALL_GRID[:2], "small", _speeds(), lambda: None)
    assert [row["status"] for row in rows] == ["skipped", "skipped"]
    assert all(row["reason"].startswith("time budget: ") for row in rows)
    assert all(row["planned_peak_bytes"] > 0 and "step_seconds" not in row for row in rows)


def test_the_gpu_grid_covers_what_the_issue_asks_and_each_point_parses_as_a_recipe_would():
    cfgs = [calibrate_steps.point_cfg(point, "unused") for point in GPU_GRID]
    kinds = {method_kind(cfg.method.method, cfg.model.quantization) for cfg in cfgs}
    assert kinds == {"lora", "lora-4bit", "dora", "adalora-4bit", "ia3", "prompt_tuning", "full"}
    assert {cfg.method.r for cfg in cfgs if cfg.method.method == "lora" and cfg.model.quantization == "none"} == {8, 64}
    assert {cfg.data.max_seq_length for cfg in cfgs} == {512, 2048}
    assert {point["rows"] for point in GPU_GRID} == {"full", "padded", "packed"}
    [full] = [(point, cfg) for point, cfg in zip(GPU_GRID, cfgs) if cfg.method.method == "full"]
    assert full[0]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert all(point["model"] != SMALL and point["tip"] for point in GPU_GRID)
    padded, packed = (next(p for p in GPU_GRID if p["rows"] == rows) for rows in ("padded", "packed"))
    assert padded["flags"] == packed["flags"]  # the same examples, packed or not
    computed = calibrate_steps.point_cfg(packed, "unused", computed=True)  # one row of every example end to end
    assert (computed.train.per_device_train_batch_size, computed.data.max_seq_length) == (1, 8 * 256)


def test_what_the_planner_reads_of_a_grid_and_an_older_file_without_one(tmp_path):
    base = {"schema": 1, "mode": "full", "device": {"kind": "cuda", "name": "NVIDIA H200"},
            "achievable": {"matmul_flops_per_second": 6e14, "bandwidth_bytes_per_second": 4e12}}
    (tmp_path / "calibration-h200.json").write_text(json.dumps(base))
    older = load_calibration("H200", tmp_path)
    assert (older.context_bytes, older.allocator_ratio, older.time_ratios, older.time_ratio("lora")) == (None,) * 4

    def row(kind, ratio, allocated, reserved, status="measured"):
        return {"status": status, "kind": kind, "measured_over_predicted": {"calibration": ratio, "data sheet": 9.0},
                "peak_allocated_bytes": allocated, "peak_reserved_bytes": reserved}

    steps = [row("lora", 1.2, 10e9, 11e9), row("lora", 1.4, 20e9, 24e9), row("lora-4bit", 2.0, 8e9, 10e9),
             row("dora", 3.0, 1e9, 2e9, status="failed"), row("ia3", None, None, None),
             {"status": "skipped", "reason": "time budget"}]
    (tmp_path / "calibration-h200.json").write_text(json.dumps({**base, "steps": steps,
                                                                "step_grid": {"context_bytes": 600 * 2**20}}))
    read = load_calibration("H200", tmp_path)
    assert read.context_bytes == 600 * 2**20
    assert read.allocator_ratio == pytest.approx(1.2)  # the median of 1.1, 1.2 and 1.25; the failed row left out
    # per kind (no figure, no kind), and every point's median for a kind the grid did not run
    assert read.time_ratios == pytest.approx({"lora": 1.3, "lora-4bit": 2.0, "all": 1.4})
    assert read.time_ratio("dora") is None
    (tmp_path / "calibration-h200.json").write_text(json.dumps({**base, "mode": "small", "steps": steps,
                                                                "step_grid": {"context_bytes": 600 * 2**20}}))
    small = load_calibration("H200", tmp_path)  # --small's tiny shapes: a check, not a calibration
    assert (small.context_bytes, small.allocator_ratio, small.time_ratios) == (None, None, None)


@pytest.mark.parametrize(("method", "quantization", "kind"), [
    ("lora", "none", "lora"), ("rslora", "none", "lora"), ("loftq", "4bit", "lora-4bit"),
    ("adalora", "4bit", "adalora-4bit"), ("full", "none", "full"), ("lora", "8bit", "lora-8bit")])
def test_method_kinds_group_methods_that_train_alike(method, quantization, kind):
    assert method_kind(method, quantization) == kind


def test_the_planner_takes_a_gpu_calibrations_context_and_step_ratios(tmp_path, monkeypatch, capsys):
    from harness.plan import speeds
    from harness.plan.cli import main as plan_main

    base = {"schema": 1, "mode": "full", "device": {"kind": "cuda", "name": "NVIDIA H200"},
            "achievable": {"matmul_flops_per_second": 6e14, "bandwidth_bytes_per_second": 4e12}}
    steps = [{"status": "measured", "kind": kind, "measured_over_predicted": {"calibration": ratio},
              "peak_allocated_bytes": 1e9, "peak_reserved_bytes": 1.1e9} for kind, ratio in (("lora", 1.5),
                                                                                             ("lora-4bit", 3.0))]

    def plans(calibration: dict) -> dict:
        (tmp_path / "calibration-h200.json").write_text(json.dumps(calibration))
        monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path))
        assert plan_main(["--model", "smollm2-135m", "--gpu", "H200", "--ranks", "8", "--json"]) == 0
        return {(p["method"], p["quantization"]): p for p in json.loads(capsys.readouterr().out)["plans"]}

    without = plans(base)  # a calibration without its step grid: its rates, the modelled context, no ratio
    grid = plans({**base, "steps": steps, "step_grid": {"context_bytes": 700 * 2**20}})
    lora = ("lora", "none")
    for plan, ratio in ((lora, 1.5), (("lora", "4bit"), 3.0), (("full", "none"), 2.25)):  # 2.25: every point's
        assert grid[plan]["step_seconds"] == pytest.approx(ratio * without[plan]["step_seconds"])
    context = {part["name"]: part for part in grid[lora]["parts"]}["CUDA context"]
    modelled = {part["name"]: part for part in without[lora]["parts"]}["CUDA context"]
    assert context["bytes"] == 700 * 2**20 != modelled["bytes"] and context["how"] == "measured (calibration-h200.json)"
    # the grid's allocator: reserved / allocated 1.1 on every point, so a tenth more than the tensors, in two parts
    tensors = sum(part["bytes"] for part in without[lora]["parts"] if part["name"] != "CUDA context")
    reserve = {part["name"]: part for part in grid[lora]["parts"] if part["name"].startswith("allocator reserve")}
    assert len(reserve) == 2 and {part["how"] for part in reserve.values()} == {"measured (calibration-h200.json)"}
    assert sum(part["bytes"] for part in reserve.values()) == pytest.approx(0.1 * tensors, abs=2)
    assert grid[lora]["planned_peak_bytes"] - without[lora]["planned_peak_bytes"] == pytest.approx(
        700 * 2**20 - modelled["bytes"] + 0.1 * tensors, abs=2)
    assert not any(part["name"].startswith("allocator") for part in without[lora]["parts"])


def test_a_calibrated_allocator_reserve_grows_with_the_batch_and_shrinks_the_largest_batch():
    from harness.plan.architectures import model_config
    from harness.plan.memory import plan_run
    from harness.run.command_line import parse_args

    cfg = parse_args({}, ["--model", "smollm2-135m", "--output_dir", "unused", "--per_device_train_batch_size", "4"])
    config = model_config("smollm2-135m")
    plain, reserved = plan_run(cfg, config), plan_run(cfg, config, allocator_ratio=1.25, allocator_how="measured")
    plain_batch, reserved_batch = (sum(p.bytes for p in plan.parts if p.scales_with_batch)
                                   for plan in (plain, reserved))
    assert reserved_batch == pytest.approx(1.25 * plain_batch, abs=1)  # the batch's share grows with it
    room = plain.total_bytes * 3
    assert reserved.max_batch_size(room) < plain.max_batch_size(room)
    assert plan_run(cfg, config, allocator_ratio=1.0).total_bytes == plain.total_bytes  # no reserve, no part
