"""How fast a device is, for the time planner: the data sheet's peaks (harness.plan.gpus) and what a calibration
measured on the device (`python -m harness.plan.calibrate`, files results/gpu/calibration-<device>.json).

A device is named as a user or a record names it: a listed GPU or alias ("A100-80", "4090"), the name torch
gives a GPU ("NVIDIA H200"), a result's `device` field ("cuda:0 NVIDIA H200", "cpu AMD EPYC (2 cores)"), or
"cpu" for this machine's CPU. Reading the files needs no torch; "cpu" alone asks harness.run.measure for the
CPU's model.
"""
from __future__ import annotations

import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError
from harness.locations import RESULTS_DIR
from harness.plan.gpus import GPU, GPUS, PeakSpeed, gpu_from_device_name, gpu_named, gpu_size

CALIBRATION_DIR = RESULTS_DIR / "gpu"  # the committed calibrations
# Another folder of calibration files, read and written in place of CALIBRATION_DIR: a user's own, or the tests'
# empty one (tests/conftest.py), so that no test depends on which machine's calibration is committed.
CALIBRATION_DIR_ENV = "FT_COOKBOOK_CALIBRATION_DIR"
CALIBRATION_SCHEMA = 1
CALIBRATE_COMMAND = "python -m harness.plan.calibrate"


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu"
    name: str  # torch's GPU name, a listed GPU's name, or the CPU's model
    gpu: GPU | None  # the listed GPU it is, if any

    @property
    def slug(self) -> str:
        """File-name part: a listed GPU's own name ("a100-80"), else the device's name ("cpu-amd-epyc")."""
        if self.gpu is not None:
            return _slug(self.gpu.name)
        return _slug(self.name) if self.kind == "cuda" else "cpu-" + _slug(self.name)


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm)\)", "", text.lower())  # Intel(R) Xeon(R) -> intel xeon
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:80] or "unknown"


def device(spec: str) -> Device:
    """The device a name means (see the module's docstring for the forms)."""
    text = " ".join(str(spec).split())
    if text.lower() == "cpu":
        from harness.run.measure import cpu_model  # imports torch: only for this machine's own CPU

        return Device("cpu", cpu_model(), None)
    cpu = re.fullmatch(r"cpu (.+?)(?: \(\d+ cores\))?", text, flags=re.IGNORECASE)
    if cpu:  # a result's device field: "cpu <model> (<n> cores)"
        return Device("cpu", cpu.group(1), None)
    text = re.sub(r"^cuda(:\d+)? ", "", text)  # "cuda:0 NVIDIA H200" -> "NVIDIA H200"
    gpu = gpu_named(text) or gpu_from_device_name(text)
    return Device("cuda", gpu.name if gpu else text, gpu)


@dataclass(frozen=True)
class Calibration:
    """What a calibration measured: the achievable figures the planner uses in place of the data sheet's."""

    device: str  # as measured ("NVIDIA H200", "Intel(R) Xeon(R) Processor")
    dtype: str  # the matmuls' dtype
    matmul_flops_per_second: float  # step-weighted rate of a training step's products (calibrate.py)
    bandwidth_bytes_per_second: float  # the better of copy and add
    threads: int | None  # CPU threads torch used (None on a GPU)
    path: Path
    # From the training-step grid of a full calibration (calibrate_steps.py); None where the file has none (an
    # older file, --no_steps, --small, a CPU, every point failed):
    context_bytes: int | None = None  # memory outside torch's allocator: CUDA context, cuBLAS and library handles
    allocator_ratio: float | None = None  # peak reserved / peak allocated, median over the measured points
    # method_kind -> measured / predicted step seconds at this calibration's own speeds, median per kind
    time_ratios: dict[str, float] | None = None
    # LoRA-rank products' rate (calibrate records them beside the training shapes, left out of the achievable
    # figure); None where the file has none
    skinny_flops_per_second: float | None = None

    def time_ratio(self, kind: str) -> float | None:
        """Measured over predicted step time for a method kind (method_kind), where the grid measured it."""
        return (self.time_ratios or {}).get(kind)


ALL_KINDS = "all"  # time_ratios' entry for every measured point: the ratio of a method kind the grid did not run


def method_kind(method: str, quantization: str) -> str:
    """A method as the step grid's time ratios group it: the method ("rslora" and "loftq" train as "lora"), with
    its base's quantization where it has one ("lora-4bit", "adalora-4bit", "full")."""
    method = "lora" if method in ("rslora", "loftq") else method
    return method if quantization in (None, "", "none") else f"{method}-{quantization}"


def calibration_path(spec: str, folder: Path | None = None) -> Path:
    return Path(folder or calibration_dir()) / f"calibration-{device(spec).slug}.json"


def calibration_dir() -> Path:
    """Where calibration files are: the folder FT_COOKBOOK_CALIBRATION_DIR names, else results/gpu."""
    folder = os.environ.get(CALIBRATION_DIR_ENV, "").strip()
    return Path(folder).expanduser() if folder else CALIBRATION_DIR


def load_calibration(spec: str, folder: Path | None = None) -> Calibration | None:
    """The calibration file for this device, or None where there is none. A file that is there but unusable
    (torn, hand-edited, another schema) is refused in one line rather than silently ignored."""
    path = calibration_path(spec, folder)
    if not path.is_file():
        return None
    fix = f"rerun {CALIBRATE_COMMAND} --overwrite on that device"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not a readable calibration ({type(exc).__name__}); {fix}") from None
    if not isinstance(record, dict) or record.get("schema") != CALIBRATION_SCHEMA:
        raise UserError(f"{path}: not a calibration of schema {CALIBRATION_SCHEMA}; {fix}")
    achieved = record.get("achievable")
    figures = {key: (achieved or {}).get(key) for key in ("matmul_flops_per_second", "bandwidth_bytes_per_second")}
    bad = [key for key, value in figures.items() if not _positive(value)]
    if bad:
        raise UserError(f"{path}: achievable.{bad[0]} is {figures[bad[0]]!r}, not a positive number; {fix}")
    measured = record.get("device") or {}
    threads = (record.get("provenance") or {}).get("threads")
    return Calibration(str(measured.get("name", "")), str(record.get("dtype", "")),
                       float(figures["matmul_flops_per_second"]), float(figures["bandwidth_bytes_per_second"]),
                       threads if measured.get("kind") == "cpu" and isinstance(threads, int) else None, path,
                       **_grid_figures(record), skinny_flops_per_second=skinny_rate(record.get("matmul")))


def skinny_rate(matmul_rows) -> float | None:
    """The median FLOP/s of a calibration's skinny (LoRA-rank) matmul rows (its record's "matmul"); None when
    there are none (an older file, a hand-made one)."""
    rows = matmul_rows if isinstance(matmul_rows, list) else []
    rates = [(row.get("flops_per_second") or {}).get("median") for row in rows
             if isinstance(row, dict) and row.get("role") == "skinny" and isinstance(row.get("flops_per_second"), dict)]
    rates = [r for r in rates if _positive(r)]
    return statistics.median(rates) if rates else None


def _grid_figures(record: dict) -> dict:
    """What the planner can take from the step grid in place of its modelled constants: the CUDA context, the
    allocator's overhead and the time model's error per method kind. Rows that are not measured, or whose
    figures are not positive numbers, are left out (the grid records failures beside its measurements)."""
    if record.get("mode") != "full":  # --small: the tiny shapes check the code; their figures calibrate nothing
        return {}
    grid = record.get("step_grid") if isinstance(record.get("step_grid"), dict) else {}
    steps = [row for row in record.get("steps") or [] if isinstance(row, dict) and row.get("status") == "measured"]
    context = grid.get("context_bytes")
    reserved = [row["peak_reserved_bytes"] / row["peak_allocated_bytes"] for row in steps
                if _positive(row.get("peak_reserved_bytes")) and _positive(row.get("peak_allocated_bytes"))]
    ratios: dict[str, list[float]] = {}
    for row in steps:
        ratio = (row.get("measured_over_predicted") or {}).get("calibration")
        if isinstance(row.get("kind"), str) and _positive(ratio):
            ratios.setdefault(row["kind"], []).append(float(ratio))
    return {"context_bytes": int(context) if _positive(context) else None,
            "allocator_ratio": statistics.median(reserved) if reserved else None,
            "time_ratios": {**{kind: statistics.median(values) for kind, values in ratios.items()},
                            ALL_KINDS: statistics.median(v for values in ratios.values() for v in values)}
            if ratios else None}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def peak_speed(spec: str) -> PeakSpeed | None:
    """The data sheet's peaks for a listed GPU (or torch's name of one); None for anything else (a CPU, an
    unlisted card, a listed card whose speed is not known)."""
    found = device(spec)
    return found.gpu.speed if found.gpu is not None else None


def require_speed(spec: str, option: str = "--gpu", folder: Path | None = None) -> tuple[PeakSpeed | None,
                                                                                        Calibration | None]:
    """(data sheet peaks, calibration) for a device the time planner is asked about, at least one of them
    known; otherwise one line that says how to get one."""
    if gpu_size(spec):
        raise UserError(f"{option} {spec}: a size has no speed; name the GPU to plan the time "
                        f"(one of: {', '.join(GPUS)})")
    calibration = load_calibration(spec, folder)
    peak = peak_speed(spec)
    if peak is None and calibration is None:
        raise UserError(f"{option} {spec}: no speed known (no data sheet figures and no calibration file "
                        f"{calibration_path(spec, folder).name}); run {CALIBRATE_COMMAND} on that device")
    return peak, calibration


def calibrated_memory(spec: str | None, folder: Path | None = None) -> dict:
    """What a calibration of this GPU measured for the memory plan (its step grid), as harness.plan.memory.plan_run
    takes it: the CUDA context and library handles (context_bytes, context_how) in place of the modelled constant,
    and the allocator's peak reserved / peak allocated (allocator_ratio, allocator_how); {} without such a
    calibration (a size, a CPU, no file, a file without a grid)."""
    if not spec or gpu_size(spec):
        return {}
    calibration = load_calibration(spec, folder)
    if calibration is None:
        return {}
    how = f"measured ({calibration.path.name})"
    found = {}
    if calibration.context_bytes:
        found.update(context_bytes=calibration.context_bytes, context_how=how)
    if calibration.allocator_ratio:
        found.update(allocator_ratio=calibration.allocator_ratio, allocator_how=how)
    return found
