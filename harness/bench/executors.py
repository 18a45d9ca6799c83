"""Where a sweep's trials run: one after another (the default), N at once on this machine's CPU
(--parallel N), or one per GPU (--gpus 0,1,2,3); harness.bench.ray_executor sends them to a Ray
cluster instead. Every executor runs a trial the same way (harness.bench.trial, its own process) and
hands each finished trial back to the sweep's main thread, which alone appends records.

The interface the sweep uses: start(jobs), next_finished() -> Finished | None (blocks; None when all
are done), stop() -> the trials that were running, stopped and recorded as interrupted.
"""
from __future__ import annotations

import concurrent.futures as futures
import math
import os
import queue
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.bench.grid import Trial
from harness.bench.trial import run_trial
from harness.errors import UserError


@dataclass
class Job:
    number: int  # 1-based position in the sweep, for the console
    trial: Trial
    trial_dir: Path


@dataclass
class Finished:
    job: Job
    outcome: dict[str, Any]
    ran_on: dict[str, Any]  # executor, host, gpu: recorded with the trial and shown in its table


@dataclass
class Slot:
    """One place a trial can run: its environment and how the record names it."""
    label: str  # "cpu" or "GPU 2"
    env: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None


def parse_gpus(text: str) -> list[str]:
    """--gpus 0,1,2,3 (nvidia-smi's numbers, or GPU-<uuid>); a GPU listed twice runs two trials."""
    gpus = [g.strip() for g in text.split(",")]
    if not all(gpus):
        raise UserError(f"--gpus {text!r}: give comma-separated GPU numbers as nvidia-smi shows them, e.g. 0,1,2,3")
    for gpu in gpus:
        if not (gpu.isdigit() or gpu.startswith(("GPU-", "MIG-"))):
            raise UserError(f"--gpus: {gpu!r} is neither a GPU number (0, 1, ...) nor a GPU-/MIG- UUID from nvidia-smi -L")
    count = gpu_count()
    if count == 0:
        raise UserError("--gpus: this machine has no NVIDIA GPU (NVML and torch see none); "
                        "to run trials at once on the CPU use --parallel N")
    too_high = [g for g in gpus if g.isdigit() and int(g) >= count]
    if too_high:
        raise UserError(f"--gpus: GPU {too_high[0]} does not exist; this machine has {count} (0 to {count - 1})")
    return gpus


def gpu_count() -> int:
    """The machine's GPUs as nvidia-smi numbers them (whatever CUDA_VISIBLE_DEVICES this process has)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver / no NVML: torch is the last word
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_slots(parallel: int | None, gpus: list[str] | None) -> list[Slot]:
    if gpus:
        # PCI_BUS_ID: CUDA's own order can differ from nvidia-smi's, whose numbers the user gave.
        return [Slot(f"GPU {g}", {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": g}, gpu=g) for g in gpus]
    if parallel:
        # Several trials at once share the CPU: a GPU left visible would be shared too, unmetered.
        return [Slot("cpu", {"CUDA_VISIBLE_DEVICES": ""}) for _ in range(parallel)]
    return [Slot("default")]  # serial, as before: the trial sees every device the sweep sees


class LocalExecutor:
    """Trials on this machine, at most one per slot at a time, each supervised by a worker thread."""

    name = "local"

    def __init__(self, slots: list[Slot], timeout_s: float, cpu_threads: int | None, echo: bool,
                 announce: Callable[[Job, str], None]):
        self.slots, self.timeout_s, self.cpu_threads = slots, timeout_s, cpu_threads
        self.echo = echo and len(slots) == 1  # several trials' progress bars would interleave: logs only
        self.announce = announce
        self._free: queue.SimpleQueue[Slot] = queue.SimpleQueue()
        for slot in slots:
            self._free.put(slot)
        self._stop, self._kill = threading.Event(), threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=len(slots), thread_name_prefix="trial")
        self._pending: set[futures.Future] = set()
        self._host = socket.gethostname()

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def describe(self) -> str:
        if len(self.slots) == 1:
            return "one trial at a time"
        where = ", ".join(s.label for s in self.slots) if self.slots[0].gpu else f"{len(self.slots)} at once on the CPU"
        return f"{len(self.slots)} trials at a time ({where})"

    def start(self, jobs: list[Job]) -> None:
        self._pending = {self._pool.submit(self._run, job) for job in jobs}

    def _run(self, job: Job) -> Finished | None:
        if self._stop.is_set():
            return None
        slot = self._free.get_nowait()  # one worker per slot: a slot is always free for a worker
        try:
            self.announce(job, "" if slot.label == "default" else slot.label)
            outcome = run_trial(job.trial.script, job.trial.argv, job.trial_dir, self.timeout_s, self.echo,
                                self.cpu_threads, env=slot.env, stop=self._stop, kill=self._kill)
        finally:
            self._free.put(slot)
        ran_on = {"executor": self.name, "host": self._host, "slots": len(self.slots), "gpu": slot.gpu}
        return Finished(job, outcome, ran_on)

    def next_finished(self) -> Finished | None:
        while self._pending:
            # A short timeout keeps this (main) thread responsive to Ctrl-C.
            done, _ = futures.wait(self._pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
            for future in done:
                self._pending.discard(future)
                finished = future.result()
                if finished is not None:
                    return finished
        self._pool.shutdown()
        return None

    def stop(self) -> list[Finished]:
        """Stop the sweep: trials not started never start; running ones are asked to stop like Ctrl-C
        (a second Ctrl-C kills them at once). Returns the running ones' outcomes, interrupted."""
        self._stop.set()
        for future in self._pending:
            future.cancel()
        stopped = []
        while self._pending:
            try:
                done, self._pending = futures.wait(self._pending, timeout=0.5)
            except KeyboardInterrupt:
                self._kill.set()
                continue
            stopped += [f.result() for f in done if not f.cancelled() and f.result() is not None]
        self._pool.shutdown()
        return stopped

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


RAY_OPTION_NAMES = ("num_cpus", "num_gpus", "memory")  # anything else is a custom resource


def parse_resources(text: str | None) -> dict[str, Any]:
    """--ray-resources num_gpus=1,num_cpus=4,A100=1 -> Ray task options (custom names go under resources).
    Here, not in ray_executor, so that the argument check (and --dry-run) refuses a bad one without Ray."""
    if not text:
        return {}
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            amount = float(value)
        except ValueError:
            amount = math.nan
        if not sep or not key or not math.isfinite(amount) or amount < 0:  # nan and inf are no amount either
            raise UserError(f"--ray-resources {item!r}: write NAME=AMOUNT with a number >= 0, "
                            "e.g. num_gpus=1,num_cpus=4")
        if key in RAY_OPTION_NAMES:
            options[key] = amount if key != "memory" else int(amount)
        else:
            options.setdefault("resources", {})[key] = amount
    return options


def check_executor_options(args) -> None:
    """The executor options that cannot go together, refused before anything is planned."""
    if args.parallel is not None and args.parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {args.parallel}")
    if args.executor == "ray":
        if args.gpus is not None:
            raise UserError("--gpus: on Ray the cluster places each trial on a GPU itself; "
                            "use --ray-resources to say what a trial needs")
        parse_resources(args.ray_resources)  # a bad one is refused now, not after the sweep is planned
        timeout = getattr(args, "ray_connect_timeout", None)
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise UserError(f"--ray-connect-timeout must be a positive number of seconds, got {timeout}")
        return
    if args.ray_address or args.ray_resources:
        raise UserError("--ray-address and --ray-resources only apply with --executor ray")
    if args.gpus is not None and args.parallel is not None:
        raise UserError("--gpus runs one trial per GPU listed and --parallel N runs N at once on the CPU; give one "
                        "(to run two trials on one GPU, list it twice: --gpus 0,0)")


def cores_note(parallel: int, cpu_threads: int | None) -> str | None:
    cores = os.cpu_count() or 1
    wanted = parallel * (cpu_threads or 1)
    if wanted > cores:
        return (f"note: {parallel} trials x {cpu_threads or 1} thread(s) ask for {wanted} cores on a {cores}-core "
                "machine: they will slow each other down, and their timings show it")
    return None


def echo_note(slots: int, quiet: bool) -> str | None:
    if slots > 1 and not quiet:
        return "Several trials at once: each trial's own output goes to its trial.log only."
    return None

