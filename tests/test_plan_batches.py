"""The time of a run at its data's real lengths (harness/plan/batches.py; harness.plan.work's step_work(batch=...)):
rows batched as SFTTrainer batches them (padded, padding-free, TRL's BFD packing), a micro-batch's work fitted
exactly to its positions and attention area, the recipe's second time line, and time_check on packing runs."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.plan import batches, speeds, work
from harness.plan.architectures import model_config
from harness.plan.batches import FLATTENED, PACKED, PADDED, MeanBatch, mean_batch, packed_rows
from harness.run.command_line import parse_args

lengths_lists = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=60)


# --- batching, without a model -----------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(lengths=lengths_lists, batch=st.integers(min_value=1, max_value=9), seed=st.integers(0, 3))
def test_every_epoch_trains_every_token_once_whatever_the_batching(lengths, batch, seed):
    per_epoch = math.ceil(len(lengths) / batch)
    for batching in (PADDED, FLATTENED):
        got = mean_batch([[n] for n in lengths], batch, batching, seed=seed)
        assert got.tokens * per_epoch == pytest.approx(sum(lengths))  # the mean over whole shuffled epochs
        assert got.rows * per_epoch == pytest.approx(len(lengths))
        assert got.positions >= got.tokens - 1e-9
        if batching == FLATTENED:
            assert got.positions == pytest.approx(got.tokens)  # no padding
            assert got.area >= got.positions ** 2 - 1e-6  # the mean of S^2 is at least the mean S squared
        else:  # padded to the longest: never beyond it, never under a row's own length
            assert got.positions <= batch * max(lengths) + 1e-9
            assert got.area <= got.positions * max(lengths) + 1e-6
    assert mean_batch([[n] for n in lengths], batch, PADDED, seed=seed) == mean_batch(
        [[n] for n in lengths], batch, PADDED, seed=seed)  # seeded: the same plan twice


def test_a_padded_batch_pads_to_its_longest_and_a_flattened_one_attends_over_its_whole_row():
    one = mean_batch([[3], [5]], 2, PADDED)  # one batch of both: 2 rows of 5
    assert (one.rows, one.positions, one.area, one.tokens) == (2, 10, 50, 8)
    flat = mean_batch([[3], [5]], 2, FLATTENED)  # one row of 8: sdpa computes all 8 x 8
    assert (flat.positions, flat.area, flat.tokens) == (8, 64, 8)
    varlen = mean_batch([[3], [5]], 2, FLATTENED, varlen=True)  # FlashAttention-2 takes each apart: 9 + 25
    assert varlen.area == 34
    fixed = mean_batch([[3], [5]], 2, PADDED, pad_to_multiple_of=16)  # the fixed-length baseline's padding
    assert (fixed.positions, fixed.area) == (32, 512)
    with pytest.raises(ValueError):
        mean_batch([[0]], 2, PADDED)  # nothing to train on is refused, not divided by zero


@settings(max_examples=25, deadline=None)
@given(lengths=lengths_lists, window=st.integers(min_value=64, max_value=200))
def test_packed_rows_are_trls_bfd_packing_of_whole_examples(lengths, window):
    rows = packed_rows(lengths, window)
    assert sorted(n for row in rows for n in row) == sorted(lengths)  # every example once, none cut
    assert all(sum(row) <= window for row in rows)
    assert len(rows) <= len(lengths)
    # BFD: no two rows could have been one
    sums = sorted(sum(row) for row in rows)
    assert len(sums) < 2 or sums[0] + sums[1] > window


def test_shorter_rows_and_flatter_batches_mean_fewer_positions():
    lengths = [40, 300, 512, 120, 77, 512, 260, 18, 305, 199, 420, 33]
    cfgs = {way: parse_args({}, ["--model", "tiny-qwen2", "--output_dir", "unused", "--max_seq_length", "512",
                                 "--per_device_train_batch_size", "4", *flags])
            for way, flags in {"fixed": ["--padding_free", "false", "--pad_to_multiple_of", "512"],
                               "padded": ["--padding_free", "false"], "flat": ["--padding_free", "true"],
                               "packed": ["--packing", "true"]}.items()}
    got = {way: batches.run_batch(cfg, lengths) for way, cfg in cfgs.items()}
    assert got["fixed"].positions == 4 * 512 and got["fixed"].batching == PADDED
    assert got["fixed"].positions > got["padded"].positions > got["flat"].positions == pytest.approx(
        sum(lengths) / 3)
    assert got["packed"].batching == PACKED and got["packed"].train_rows < len(lengths)  # fewer, fuller rows
    prompt = parse_args({}, ["--model", "tiny-qwen2", "--output_dir", "unused", "--method", "prompt_tuning",
                             "--padding_free", "true"])
    assert batches.run_batch(prompt, lengths).batching == PADDED  # a prompt method is never flattened


# --- a micro-batch's work at any length -------------------------------------------------------------------------

def _cfg(*flags: str, window: int = 160):
    return parse_args({}, ["--model", "tiny-qwen2", "--output_dir", "unused", "--per_device_train_batch_size", "2",
                           "--gradient_accumulation_steps", "1", "--max_seq_length", str(window),
                           "--activation_checkpointing", "false", *flags])


@pytest.mark.parametrize("flags", [("--method", "lora"), ("--method", "dora", "--activation_checkpointing", "true"),
                                   ("--method", "prompt_tuning"), ("--method", "full"), ("--method", "adalora")])
def test_the_fit_of_three_counts_equals_a_fourth_count_at_any_length(flags):
    config = model_config("tiny-qwen2")
    for length in (87, 157, 320):  # inside the fitted lengths, between them, and beyond the window
        padded = MeanBatch(2, 2 * length, 2 * length**2, 2 * length, 10, PADDED, "")
        fitted = work.step_work(_cfg(*flags), config, torch.float32, batch=padded)
        counted = work.step_work(_cfg(*flags, window=length), config, torch.float32)
        assert dataclasses.asdict(fitted) == dataclasses.asdict(counted), length


def test_a_flattened_batch_of_full_rows_costs_what_the_window_count_says():
    config = model_config("tiny-qwen2")
    cfg = _cfg("--padding_free", "true")
    whole = MeanBatch(2, 2 * 160, (2 * 160) ** 2, 2 * 160, 10, FLATTENED, "")
    assert dataclasses.asdict(work.step_work(cfg, config, torch.float32, batch=whole)) == dataclasses.asdict(
        work.step_work(cfg, config, torch.float32))
    half = MeanBatch(2, 160, 160**2, 160, 10, FLATTENED, "")  # rows half as long: a quarter of the attention
    short = work.step_work(cfg, config, torch.float32, batch=half)
    full = work.step_work(cfg, config, torch.float32)
    assert short.attention_flops * 4 == pytest.approx(full.attention_flops, rel=1e-6)
    assert short.tokens == 160 and full.flops / 2 < full.flops - short.flops < full.flops


# --- the recipe's line once its data are tokenized ----------------------------------------------------------------

def _cpu_calibration(folder):
    path = speeds.calibration_path("cpu", folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema": 1, "dtype": "float32", "device": {"kind": "cpu", "name": "this test's CPU"},
        "achievable": {"matmul_flops_per_second": 5e10, "bandwidth_bytes_per_second": 5e9},
        "provenance": {"threads": 1}}))


def _reviews(path, n: int = 24):
    words = "good bad film story acting plot é 😀 \x85".split()
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(1 + 3 * (i % 7))),
             "label": "positive" if i % 2 else "negative"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _run(tmp_path, *flags):
    from harness.bench.grid import load_defaults
    from harness.locations import REPO_ROOT
    from harness.run.flow import preflight

    cfg = parse_args(load_defaults("qwen2_5_0_5b_lora", REPO_ROOT / "recipes" / "qwen2_5_0_5b_lora.py"),
                     ["--model", "tiny-qwen2", "--output_dir", str(tmp_path / "out"), "--data_file",
                      str(_reviews(tmp_path / "reviews.json")), "--task", "classification", "--validation_split",
                      "0.25", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
                      "--max_seq_length", "128", "--num_train_epochs", "1", *flags])
    return cfg, preflight(cfg, output_dir=False)


def test_a_recipe_says_its_time_again_from_its_tokenized_rows(tmp_path, monkeypatch, capsys):
    from harness.models.loading import load_tokenizer
    from harness.objectives.registry import objective_of
    from harness.plan.preflight import check_memory_plan, time_from_data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _cpu_calibration(tmp_path / "cal")
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "cal"))
    seconds = {}
    for way, flags in {"padded": ("--padding_free", "false"), "packed": ("--packing", "true")}.items():
        cfg, workload = _run(tmp_path, *flags)
        record = check_memory_plan(cfg, workload.targs, workload)
        prepared = objective_of(cfg).prepare(cfg, workload, load_tokenizer(cfg.model))
        capsys.readouterr()
        time_from_data(cfg, workload.targs, prepared, record)
        line = capsys.readouterr().out.strip()
        got = record["time_plan"]["from_data"]
        lengths = [len(r) for r in prepared.train["input_ids"]]
        assert line.startswith("Time from the data's tokens: predicted ") and "on this machine's CPU" in line
        assert f"{len(lengths)} examples of {sum(lengths) / len(lengths):,.0f} tokens on average" in line
        assert got["batch"]["batching"] == way and got["train_rows"] == got["batch"]["train_rows"]
        # shorter than the window: less than the plan line's "at most"
        assert got["run_seconds"]["estimate"] < record["time_plan"]["run_seconds"]["estimate"]
        seconds[way] = got
    assert seconds["packed"]["train_rows"] < seconds["padded"]["train_rows"]  # packing: fewer rows, fewer steps
    assert seconds["packed"]["steps"] < seconds["padded"]["steps"]


def test_without_a_speed_the_recipe_says_nothing_more(tmp_path, monkeypatch, capsys):
    from harness.models.loading import load_tokenizer
    from harness.objectives.registry import objective_of
    from harness.plan.preflight import check_memory_plan, time_from_data

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "none"))
    cfg, workload = _run(tmp_path)
    record = check_memory_plan(cfg, workload.targs, workload)
    prepared = objective_of(cfg).prepare(cfg, workload, load_tokenizer(cfg.model))
    capsys.readouterr()
    time_from_data(cfg, workload.targs, prepared, record)
    assert capsys.readouterr().out == "" and "from_data" not in record["time_plan"]


# --- time_check on packing runs -----------------------------------------------------------------------------------

def _packing_json(tmp_path, cfg_flags: dict[str, tuple], seconds: float = 10.0):
    from harness.run.measure import device_name

    runs = {}
    for way, flags in cfg_flags.items():
        cfg, _ = _run(tmp_path, *flags)
        config = cfg.to_dict()
        runs[way] = [{"train_seconds": seconds, "global_step": 9, "tokens_per_second": 1.0, "config": config}]
    path = tmp_path / "packing.json"
    path.write_text(json.dumps({"command": "python -m harness.bench.packing_timing -- x", "device": device_name(),
                                "model": "tiny-qwen2", "git": {"commit": "abc"}, "versions": {}, "cpu_threads": 1,
                                "runs": runs}))
    return path


def test_time_check_predicts_packing_runs_at_their_own_batching(tmp_path, monkeypatch):
    from harness.plan import time_check

    _cpu_calibration(tmp_path / "cal")
    monkeypatch.setenv(speeds.CALIBRATION_DIR_ENV, str(tmp_path / "cal"))
    path = _packing_json(tmp_path, {"fixed": ("--padding_free", "false", "--pad_to_multiple_of", "128"),
                                    "padded": ("--padding_free", "false"), "flat": ("--padding_free", "true")})
    records = time_check._packing_records(path)
    assert [r["trial_id"] for r in records] == ["fixed #1", "padded #1", "flat #1"]
    rows = {r["trial"].split("/")[1]: r for r in (time_check.predict(r) for r in records)}  # this CPU's calibration
    assert all("predicted" in r for r in rows.values()), rows
    assert rows["fixed #1"]["predicted"] > rows["padded #1"]["predicted"] > rows["flat #1"]["predicted"]


def test_time_check_refuses_a_file_that_is_not_a_packing_json_in_one_line(tmp_path, capsys):
    from harness.plan import time_check

    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [1, 2]}')
    runs = tmp_path / "runs.jsonl"
    runs.write_text("")
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(SystemExit) as stop:
            time_check.main(["--runs", str(runs), "--packing", str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--packing {path}" in err[0] and "packing_timing" in err[0]


# --- python -m harness.plan on a recipe ---------------------------------------------------------------------------

def test_the_plan_of_a_recipe_adds_its_run_at_its_rows_real_lengths(tmp_path, monkeypatch, capsys):
    from harness.locations import REPO_ROOT
    from harness.plan.cli import main as plan_main

    recipe = str(REPO_ROOT / "recipes" / "qwen2_5_0_5b_lora.py")
    data = _reviews(tmp_path / "reviews.json")
    flags = ["--model", "tiny-qwen2", "--data_file", str(data), "--task", "classification", "--validation_split",
             "0.25", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_seq_length",
             "128", "--num_train_epochs", "1", "--gpu", "A100-80"]
    assert plan_main([recipe, *flags, "--packing", "true"]) == 0
    text, err = capsys.readouterr()
    assert "At its rows' real lengths (18 examples of " in text and "packed (TRL's BFD) into " in text
    assert "Map" not in err and "examples/s" not in err  # tokenizing for a plan draws no progress bars
    assert plan_main([recipe, *flags, "--packing", "true", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["plans"][0]
    real = got["from_data"]
    assert real["batch"]["batching"] == PACKED and real["train_rows"] == real["batch"]["train_rows"] < 18
    assert real["steps"] < got["steps"] and real["run_seconds"]["estimate"] < got["run_seconds"]["estimate"]
    # a model whose tokenizer is not here: the reason, and the "at most" time alone
    assert plan_main([recipe, *flags[:1], "Qwen/Qwen2.5-0.5B-Instruct", *flags[2:], "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["plans"][0]
    assert "tokenizer of Qwen/Qwen2.5-0.5B-Instruct is not here" in got["from_data"]["reason"] and got["steps"] == 9
