"""Device speeds: the GPU table's data-sheet figures, the calibration command (`python -m harness.plan.calibrate`,
run here on the CPU in --small mode), and reading a calibration back for the time planner. Nothing here
depends on how fast this machine is beyond "positive and finite"."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from harness.errors import UserError
from harness.locations import REPO_ROOT
from harness.plan import gpus
from harness.plan.calibrate import main as calibrate_main
from harness.plan.gpus import GPU, GPU_TABLE, gpu_from_device_name, gpu_memory, gpu_named
from harness.plan.speeds import device, load_calibration, require_speed
from harness.reporting.flops import gpu_peak_tflops

# What torch.cuda.get_device_name() says for each listed GPU.
TORCH_NAMES = {
    "T4": "Tesla T4", "L4": "NVIDIA L4", "A10G": "NVIDIA A10G", "A10": "NVIDIA A10",
    "RTX 3090": "NVIDIA GeForce RTX 3090", "RTX 4090": "NVIDIA GeForce RTX 4090", "A6000": "NVIDIA RTX A6000",
    "L40S": "NVIDIA L40S", "V100": "Tesla V100-SXM2-16GB", "V100-32": "Tesla V100-SXM2-32GB",
    "A100-40": "NVIDIA A100-SXM4-40GB", "A100-80": "NVIDIA A100-SXM4-80GB", "H100": "NVIDIA H100 80GB HBM3",
    "H100 PCIe": "NVIDIA H100 PCIe", "H200": "NVIDIA H200",
}
PRE_AMPERE = {"T4", "V100", "V100-32"}  # Turing and Volta: fp16 tensor cores only


def _calibrate(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # the CPU, on one thread
    return subprocess.run([sys.executable, "-m", "harness.plan.calibrate", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_small_calibration_on_the_cpu_writes_a_record_that_reads_back_and_is_not_overwritten(tmp_path):
    out = tmp_path / "calibrations"
    done = _calibrate("--small", "--device", "cpu", "--output", str(out), "--no_steps")
    assert done.returncode == 0, done.stderr
    [record_path] = out.glob("calibration-cpu-*.json")
    assert record_path.with_suffix(".md").is_file()
    record = json.loads(record_path.read_text())
    assert record["schema"] == 1 and record["mode"] == "small" and record["dtype"] == "float32"
    # --no_steps: no training-step grid (tests/test_calibrate_steps.py runs it), and the page says so
    assert record["steps"] == [] and record["step_grid"] is None
    assert "Training steps: not measured (--no_steps)." in record_path.with_suffix(".md").read_text()
    assert record["device"]["kind"] == "cpu" and record["device"]["name"] and record["data_sheet"] is None
    provenance = record["provenance"]
    assert provenance["date"] and provenance["commit"] and provenance["threads"] == 1
    assert {"torch", "transformers", "peft"} <= set(provenance["versions"])
    assert provenance["command"] == f"python -m harness.plan.calibrate --small --device cpu --output {out} --no_steps"
    assert len(record["matmul"]) >= 4 and len(record["bandwidth"]) == 2
    for row in record["matmul"]:
        assert all(_finite_positive(row["flops_per_second"][k]) for k in ("median", "min", "max")), row
        assert row["flops_per_second"]["min"] <= row["flops_per_second"]["median"] <= row["flops_per_second"]["max"]
    for row in record["bandwidth"]:
        assert all(_finite_positive(row["bytes_per_second"][k]) for k in ("median", "min", "max")), row
    _assert_the_headline_is_the_step_weighted_rate_of_the_rows(record)

    calibration = load_calibration(f"cpu {record['device']['name']}", out)
    assert calibration.matmul_flops_per_second == record["achievable"]["matmul_flops_per_second"]
    assert calibration.bandwidth_bytes_per_second == record["achievable"]["bandwidth_bytes_per_second"]
    assert _finite_positive(calibration.matmul_flops_per_second) and calibration.threads == 1

    before = record_path.read_bytes(), record_path.stat().st_ino
    again = _calibrate("--small", "--device", "cpu", "--output", str(out), "--no_steps")
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr.splitlines() == [f"calibrate: {record_path} exists; pass --overwrite to replace it, "
                                         "or --output DIR to write elsewhere"]
    assert (record_path.read_bytes(), record_path.stat().st_ino) == before

    replaced = _calibrate("--small", "--device", "cpu", "--output", str(out), "--no_steps", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert record_path.stat().st_ino != before[1]  # written anew, whole (a new file renamed over the old)
    assert json.loads(record_path.read_text())["provenance"]["command"].endswith("--overwrite")


def _assert_the_headline_is_the_step_weighted_rate_of_the_rows(record: dict) -> None:
    """Each training shape has its forward product and autograd's two backward ones (grad_input = grad_out @ W,
    grad_weight = X^T @ grad_out: the token count is its inner dimension), the LM head among them; the headline
    is their FLOPs over their time, each row counted as often as a step makes it."""
    training = [row for row in record["matmul"] if row["role"] == "training"]
    by_shape: dict[str, dict] = {}
    for row in training:
        assert row["flops"] == 2 * row["m"] * row["k"] * row["n"] and row["count"] >= 1, row
        by_shape.setdefault(row["shape"], {})[row["pass"]] = row
    assert any("LM head" in shape for shape in by_shape)
    for shape, passes in by_shape.items():
        assert set(passes) == {"forward", "grad_input", "grad_weight"}, shape
        tokens, fan_in, fan_out = passes["forward"]["m"], passes["forward"]["k"], passes["forward"]["n"]
        assert [passes["grad_input"][d] for d in "mkn"] == [tokens, fan_out, fan_in], shape
        assert [passes["grad_weight"][d] for d in "mkn"] == [fan_in, tokens, fan_out], shape
    total_flops = sum(row["count"] * row["flops"] for row in training)
    total_seconds = sum(row["count"] * row["seconds"]["median"] for row in training)
    assert record["achievable"]["matmul_flops_per_second"] == pytest.approx(total_flops / total_seconds, rel=1e-12)


def test_on_a_gpu_the_file_is_named_for_the_listed_gpu_and_set_beside_its_data_sheet(monkeypatch, tmp_path, capsys):
    """The GPU branch of the command, on a machine without one: torch.cuda answers as an H200 would and the
    arithmetic runs on the CPU (in bf16, as on the card); what is checked is the naming, the dtype, the data
    sheet beside the figures and the read-back, not the speed."""
    import types

    import torch

    from harness.plan import calibrate

    fake = {"is_available": lambda: True, "device_count": lambda: 1,
            "get_device_name": lambda index=None: "NVIDIA H200", "is_bf16_supported": lambda: True,
            "synchronize": lambda device=None: None,
            "mem_get_info": lambda device=None: (140 * 2**30, 143 * 2**30),
            "get_device_properties": lambda device=None: types.SimpleNamespace(
                total_memory=143771 * 2**20, major=9, minor=0, multi_processor_count=132)}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(calibrate, "_where", lambda torch, dev, index: torch.device("cpu"))
    monkeypatch.setattr(calibrate, "REPEAT_S", {**calibrate.REPEAT_S, ("cuda", "small"): 0.0})  # one call a repeat
    monkeypatch.setattr(calibrate, "BANDWIDTH_MIB", {**calibrate.BANDWIDTH_MIB, ("cuda", "small"): 4})
    out = tmp_path / "gpu"
    threads = torch.get_num_threads()
    try:
        assert calibrate_main(["--small", "--repeats", "3", "--threads", "2", "--output", str(out), "--no_steps"]) == 0
    finally:
        torch.set_num_threads(threads)  # the rest of this process keeps its own
    record = json.loads((out / "calibration-h200.json").read_text())
    assert record["provenance"]["threads"] == 2
    assert record["provenance"]["command"].endswith(f"--output {out} --no_steps")
    assert record["dtype"] == "bfloat16" and record["device"]["gpu"] == "H200" and record["device"]["kind"] == "cuda"
    assert record["device"]["capability"] == "9.0" and record["provenance"]["allow_tf32"] is not None
    assert record["data_sheet"]["matmul_flops_per_second"] == 989.4e12 and record["data_sheet"]["dense"] is True
    assert "of the data sheet's peak" in (out / "calibration-h200.md").read_text()
    _assert_the_headline_is_the_step_weighted_rate_of_the_rows(record)
    for spec in ("H200", "NVIDIA H200", "cuda:0 NVIDIA H200"):
        assert load_calibration(spec, out).matmul_flops_per_second == record["achievable"]["matmul_flops_per_second"]
    assert "wrote " in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "expected"), [
    (["--device", "tpu"], "calibrate: --device 'tpu': use cpu, cuda or cuda:N"),
    (["--device", "cpu:1"], "calibrate: --device 'cpu:1': use cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "calibrate: --device 'cuda:x': use cpu, cuda or cuda:N"),
    (["--repeats", "1"], "calibrate: --repeats 1: give 3 to 100"),
    (["--threads", "0"], "calibrate: --threads 0: give 1 to 1024"),
    (["--dtype", "int8"], "calibrate: argument --dtype: invalid choice: 'int8'"),
])
def test_bad_settings_are_refused_in_one_line_before_anything_is_written(argv, expected, tmp_path, capsys):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        calibrate_main([*argv, "--small", "--output", str(out)])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith(expected), captured.err
    assert not out.exists()


def test_a_gpu_is_refused_in_one_line_where_torch_sees_none(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --device cuda is valid here")
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        calibrate_main(["--device", "cuda", "--small", "--output", str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "calibrate: --device cuda: torch sees no CUDA GPU on this machine; use --device cpu (or leave --device "
        "out) to measure the CPU"]
    assert not out.exists()


def test_every_listed_gpu_has_memory_bandwidth_and_dense_peaks_for_the_dtypes_it_has():
    for name in ("L40S", "A6000", "RTX 4090", "RTX 3090", "A10G", "L4", "T4", "V100", "A100-40", "A100-80",
                 "H100", "H200"):
        assert gpu_named(name) is not None, name  # the list, at least
    assert {gpu.name for gpu in GPU_TABLE} == set(TORCH_NAMES)
    for gpu in GPU_TABLE:
        speed = gpu.speed
        assert gpu.mib > 10_000 and speed is not None and speed.source, gpu.name
        assert speed.bandwidth >= 300e9, gpu.name  # bytes/s, not GB/s
        assert speed.fp16 >= speed.fp32 > 1e12, gpu.name  # FLOP/s, not TFLOP/s; tensor cores beat CUDA cores
        if gpu.name in PRE_AMPERE:
            assert speed.bf16 is None and speed.tf32 is None and speed.matmul("bfloat16") is None, gpu.name
        else:
            assert speed.bf16 >= speed.tf32 >= speed.fp32 and speed.matmul("bfloat16") == speed.bf16, gpu.name
        assert gpu_from_device_name(TORCH_NAMES[gpu.name]) is gpu, gpu.name
        # Where the MFU table (harness.reporting.flops) lists the card, it holds the same dense 16-bit peak.
        mfu_peak = gpu_peak_tflops(f"cuda:0 {TORCH_NAMES[gpu.name]}")
        assert mfu_peak is None or mfu_peak == pytest.approx((speed.bf16 or speed.fp16) / 1e12, rel=1e-3), gpu.name
    # Dense, not the data sheets' "with sparsity" headline (which is twice these).
    assert gpu_named("H100").speed.bf16 == 989.4e12 and gpu_named("A100-80").speed.bf16 == 312e12
    assert gpu_named("L4").speed.bf16 == 121e12 and gpu_named("L40S").speed.tf32 == 183e12


def test_names_aliases_and_memory_stay_as_they_were():
    assert gpu_memory("T4") == ("T4", 15.0)
    assert gpu_memory("24GB") == ("24 GiB", 24.0) and gpu_memory("3090") == ("3090 GiB", 3090.0)  # a number is a size
    for alias, name in [("rtx3090", "RTX 3090"), ("rtx-4090", "RTX 4090"), ("a100", "A100-80"),
                        ("A100 40GB", "A100-40"), ("h100-80gb", "H100"), ("A10", "A10"), ("a10g", "A10G"),
                        ("RTX A6000", "A6000")]:
        assert gpu_memory(alias)[0] == name, alias
    with pytest.raises(UserError, match=r"^--gpu: unknown GPU 'T5'; use a size in GiB"):
        gpu_memory("T5")
    # Variants of another speed are not taken for the listed card; a MIG slice is a fraction of one.
    for other in ("NVIDIA GeForce RTX 3090 Ti", "NVIDIA A100 80GB PCIe", "Tesla V100-PCIE-16GB", "NVIDIA H200 NVL",
                  "NVIDIA A100-SXM4-40GB MIG 1g.5gb"):
        assert gpu_from_device_name(other) is None, other
    assert device("cpu AMD EPYC (2 cores)").slug == "cpu-amd-epyc"
    assert device("cuda:0 NVIDIA A100-SXM4-80GB").slug == device("A100-80").slug == "a100-80"


def test_a_gpu_with_memory_but_no_speed_is_refused_until_a_calibration_exists(monkeypatch, tmp_path):
    monkeypatch.setitem(gpus.GPUS, "X1", GPU("X1", 2048, r"\bX1\b", None))
    monkeypatch.setitem(gpus._BY_KEY, "x1", "X1")
    assert gpu_memory("x1") == ("X1", 2.0)  # memory planning works as before
    with pytest.raises(UserError) as refused:
        require_speed("X1", folder=tmp_path)
    assert str(refused.value) == ("--gpu X1: no speed known (no data sheet figures and no calibration file "
                                  "calibration-x1.json); run python -m harness.plan.calibrate on that device")
    with pytest.raises(UserError, match=r"^--gpu 16: a size has no speed; name the GPU"):
        require_speed("16", folder=tmp_path)

    record = {"schema": 1, "device": {"kind": "cuda", "name": "NVIDIA X1"},
              "achievable": {"matmul_flops_per_second": 5e13, "bandwidth_bytes_per_second": 4e11}}
    (tmp_path / "calibration-x1.json").write_text(json.dumps(record))
    peak, calibration = require_speed("X1", folder=tmp_path)
    assert peak is None and calibration.matmul_flops_per_second == 5e13 and calibration.threads is None


@pytest.mark.parametrize(("text", "problem"), [
    ("{not json", "not a readable calibration (JSONDecodeError)"),
    ('{"schema": 2}', "not a calibration of schema 1"),
    ('{"schema": 1, "achievable": {"matmul_flops_per_second": -1, "bandwidth_bytes_per_second": 1e9}}',
     "achievable.matmul_flops_per_second is -1, not a positive number"),
    ('{"schema": 1, "achievable": {"matmul_flops_per_second": 1e9, "bandwidth_bytes_per_second": NaN}}',
     "achievable.bandwidth_bytes_per_second is nan, not a positive number"),
])
def test_an_unusable_calibration_file_is_refused_in_one_line(text, problem, tmp_path):
    path = tmp_path / "calibration-t4.json"
    path.write_text(text)
    with pytest.raises(UserError) as refused:
        load_calibration("Tesla T4", tmp_path)
    assert str(refused.value) == (f"{path}: {problem}; rerun python -m harness.plan.calibrate --overwrite on "
                                  "that device")
    assert load_calibration("L4", tmp_path) is None  # no file: nothing measured, not an error
