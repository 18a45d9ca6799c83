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
import re
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError
from harness.locations import RESULTS_DIR
from harness.plan.gpus import GPU, GPUS, PeakSpeed, gpu_from_device_name, gpu_named, gpu_size

CALIBRATION_DIR = RESULTS_DIR / "gpu"
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


def calibration_path(spec: str, folder: Path | None = None) -> Path:
    return Path(folder or CALIBRATION_DIR) / f"calibration-{device(spec).slug}.json"


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
                       threads if measured.get("kind") == "cpu" and isinstance(threads, int) else None, path)


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
