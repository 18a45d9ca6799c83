"""Measuring a run (peak memory, time) and recording it with its provenance.

Memory is reported with the kind of measurement it is, never as 0 for "not measured":
  cuda_reserved  - peak bytes reserved by PyTorch's CUDA allocator, minus the baseline after CUDA init
  cuda_allocated - peak bytes held by live tensors
  nvml_used      - peak GPU memory seen by the driver (all of this process's allocations, the CUDA context
                   and memory PyTorch does not allocate), sampled; nvml_used_source says whose: "process"
                   (NVML's per-process figure for this pid) or "device" (the whole GPU's used memory, other
                   processes included: where NVML cannot tell this process apart, e.g. a container whose
                   pids are not the host's)
  cpu_rss        - peak resident set size of this process (when there is no GPU)
"""
from __future__ import annotations

import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from harness.locations import REPO_ROOT
from harness.run.distributed import launched_processes, strategy

MB = 1024 * 1024


class NvmlPeakSampler:
    """Samples this process's GPU memory in a thread; NVML also sees memory PyTorch doesn't allocate.

    This process's own figure comes from NVML's per-process query (the processes using the GPU, each with
    its memory); the device's used memory counts every process on the GPU (two trials of
    `harness.bench --gpus 0,0` would each record both), so it is only the fallback, for when this pid is
    never among NVML's processes (a container's own pid numbering) or NVML cannot say how much it uses."""

    def __init__(self, device_index: int, interval_s: float = 0.05):
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = _nvml_handle(pynvml, device_index)
        self._interval = interval_s
        self._pid = os.getpid()
        self.device_peak_bytes = 0
        self.process_peak_bytes: int | None = None  # None until NVML has listed this process with a figure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
        self.device_peak_bytes = max(self.device_peak_bytes, used)
        own = self._own_bytes()
        if own is not None:
            self.process_peak_bytes = max(self.process_peak_bytes or 0, own)

    def _own_bytes(self) -> int | None:
        try:
            processes = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
        except self._nvml.NVMLError:  # not supported here (some vGPU/MIG set-ups): the device figure stands
            return None
        for process in processes:
            used = getattr(process, "usedGpuMemory", None)
            # NVML reports NVML_VALUE_NOT_AVAILABLE (None in pynvml) where it cannot measure a process
            if process.pid == self._pid and isinstance(used, int):
                return used
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    @property
    def source(self) -> str:
        return "process" if self.process_peak_bytes is not None else "device"

    @property
    def peak_bytes(self) -> int:
        return self.process_peak_bytes if self.process_peak_bytes is not None else self.device_peak_bytes

    def stop(self) -> tuple[int, str]:
        """(peak bytes, "process" or "device": whose memory they are)."""
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()
        return self.peak_bytes, self.source


def _nvml_handle(pynvml, cuda_index: int):
    """NVML's handle of the GPU torch calls cuda:<cuda_index>. NVML numbers every GPU of the machine while
    CUDA numbers only those CUDA_VISIBLE_DEVICES shows (a trial of `harness.bench --gpus 2` sees GPU 2 as
    cuda:0), so the GPU is found by its UUID; by index only where torch gives none and every GPU is visible."""
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}")
    except Exception:
        if os.environ.get("CUDA_VISIBLE_DEVICES"):  # the index would name another GPU: measure nothing instead
            raise
        return pynvml.nvmlDeviceGetHandleByIndex(cuda_index)


class PeakMemory:
    """Start before the model is loaded; `read()` gives every peak that could be measured here."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.baseline_reserved = 0
        self.nvml: NvmlPeakSampler | None = None
        if self.cuda:
            torch.cuda.init()
            torch.cuda.reset_peak_memory_stats()
            torch.zeros(1, device="cuda")  # create the context so the baseline includes it
            self.baseline_reserved = torch.cuda.memory_reserved()
            try:
                self.nvml = NvmlPeakSampler(torch.cuda.current_device())
            except Exception:  # NVML missing (e.g. some containers): the CUDA figures still stand
                self.nvml = None

    def read(self) -> dict[str, Any]:
        memory: dict[str, Any] = {"cpu_rss_mb": round(peak_rss_mb(), 1)}
        if self.cuda:
            memory["cuda_reserved_mb"] = round((torch.cuda.max_memory_reserved() - self.baseline_reserved) / MB, 1)
            memory["cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / MB, 1)
            if self.nvml is not None:
                peak, source = self.nvml.stop()
                memory["nvml_used_mb"] = round(peak / MB, 1)
                memory["nvml_used_source"] = source
                self.nvml = None
            memory["peak_memory_mb"] = memory["cuda_reserved_mb"]
            memory["peak_memory_kind"] = "cuda_reserved"
        else:
            memory["peak_memory_mb"] = memory["cpu_rss_mb"]
            memory["peak_memory_kind"] = "cpu_rss"
        return memory


def apply_memory_budget(budget_gb: float | None) -> dict[str, Any]:
    """Cap this process's CUDA memory at budget_gb GiB (to emulate a smaller GPU); call before loading.

    The cap is the caching allocator's per-process memory fraction: past it, an allocation raises
    torch.OutOfMemoryError as it would on a GPU that size. The CUDA context and memory PyTorch does not
    allocate (bitsandbytes' paged optimizer states) are outside it. On CPU nothing is enforced; the
    returned record says so, and harness.bench compares the trial's peak RSS with the budget. The
    budget is positive: harness.run.checks refuses anything else before any data or model is loaded.
    """
    if budget_gb is None:
        return {}
    record: dict[str, Any] = {"memory_budget_gb": budget_gb}
    if not torch.cuda.is_available():
        print(f"Memory budget {budget_gb:g} GiB: not enforced on CPU (compare peak_memory_mb after the run).")
        return {**record, "memory_budget_enforced": "not_enforced_cpu"}
    device = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(device).total_memory
    budget = budget_gb * 1024**3
    if budget >= total:  # e.g. 16 on a 16 GB T4 (15.x GiB usable): the card itself is the limit
        print(f"Memory budget {budget_gb:g} GiB >= this GPU's {total / 1024**3:.1f} GiB: no cap needed.")
        return {**record, "memory_budget_enforced": "whole_device"}
    torch.cuda.set_per_process_memory_fraction(budget / total, device)
    print(f"Memory budget: PyTorch may use {budget_gb:g} of this GPU's {total / 1024**3:.1f} GiB.")
    return {**record, "memory_budget_enforced": "cuda_allocator"}


def peak_rss_mb(usage=None) -> float:
    """Peak RSS in MiB of this process, or of the child whose rusage (from os.wait4) is given.
    Linux reports ru_maxrss in KiB, macOS in bytes."""
    peak = (usage or resource.getrusage(resource.RUSAGE_SELF)).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def device_name() -> str:
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"cpu {cpu_model()} ({os.cpu_count()} cores)"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda or "unknown"
    return found


def git_state() -> dict[str, Any]:
    """Commit and whether the working tree differs from it; None where this isn't a git checkout.

    Changes under results/ do not count: the project's own tools write there (a sweep appends each
    trial's record and redraws its tables), so counting them would mark every trial after a sweep's
    first as made from uncommitted code."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"commit": commit, "dirty": bool(status) if commit else None}


def command_line(recipe: str, argv: list[str]) -> str:
    """The command that repeats this run, from the repo root (interpreter shown as 'python'; under several
    processes the accelerate launch that starts as many, with the same strategy)."""
    script = Path("recipes") / f"{recipe}.py"
    program = [str(script), *argv] if (REPO_ROOT / script).is_file() else sys.argv
    processes = launched_processes()
    if processes == 1:
        return shlex.join(["python", *program])
    # --multi_gpu also on a machine without a GPU: accelerate's --cpu launcher starts one process without MPI.
    how = {"fsdp": "--use_fsdp", "deepspeed": "--use_deepspeed"}.get(strategy(), "--multi_gpu")
    return shlex.join(["accelerate", "launch", how, "--num_processes", str(processes), *program])


class Stopwatch:
    """Monotonic wall time since creation."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
