"""--executor ray: every trial a Ray task, on a cluster (--ray-address) or a local Ray.

Each task asks for one GPU when the cluster has GPUs, else for --cpu-threads CPUs (or what
--ray-resources says), and runs on its worker exactly what a local sweep runs:
`python -m harness.bench.trial SPEC` in the project's folder, which supervises the recipe's own
process (timeout, parent-death signal) and prints the outcome, result.json included. The outcome
travels back to this machine, whose main thread alone appends it to runs.jsonl.

Where things land: every node needs the project at the same path as here, with the same Python
packages (a shared filesystem or the same image). A trial's folder (adapter, trial.log) is written
at the path this machine gave it, on the node that ran it: on a shared filesystem that is this
machine's outputs/bench/, otherwise it stays on that node; the record names the host either way.

A worker that dies (node lost, killed for memory) is retried once by Ray (max_retries=1), then
recorded as failed. Ctrl-C cancels every outstanding task (each running trial is asked to stop as
Ctrl-C would, a second Ctrl-C kills them) and records them as interrupted. At most as many tasks as
the cluster can run at once are outstanding (--parallel N sets another number), so a stopped sweep
leaves nothing queued.
"""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any, Callable

from harness.bench.executors import Finished, Job
from harness.bench.trial import DIE_WITH_PARENT, STOP_GRACE_S, not_run
from harness.errors import UserError
from harness.locations import REPO_ROOT

INSTALL_HINT = 'pip install -e ".[ray]" (an optional extra)'
RAY_OPTION_NAMES = ("num_cpus", "num_gpus", "memory")  # anything else is a custom resource


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def parse_resources(text: str | None) -> dict[str, Any]:
    """--ray-resources num_gpus=1,num_cpus=4,A100=1 -> Ray task options (custom names go under resources)."""
    if not text:
        return {}
    options: dict[str, Any] = {}
    for item in text.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        try:
            amount = float(value)
        except ValueError:
            amount = -1.0
        if not sep or not key or amount < 0:
            raise UserError(f"--ray-resources {item!r}: write NAME=AMOUNT, e.g. num_gpus=1,num_cpus=4")
        if key in RAY_OPTION_NAMES:
            options[key] = amount if key != "memory" else int(amount)
        else:
            options.setdefault("resources", {})[key] = amount
    return options


def _asked(options: dict[str, Any]) -> dict[str, float]:
    """The task's demand in the names cluster_resources() uses."""
    asked = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    if options.get("memory"):
        asked["memory"] = options["memory"]
    return {k: v for k, v in asked.items() if v}


def _trial_task():
    """The function a Ray worker runs. Defined inside a function so Ray ships it by value: a node that
    lacks this project then gets a clear failure instead of an import error. Standard library only."""
    def run_trial_on_this_node(repo_root: str, die_with_parent: str, spec: str) -> dict:
        import json
        import os
        import signal
        import socket
        import subprocess
        import sys
        import tempfile
        import time

        import ray

        host = socket.gethostname()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        if not os.path.isfile(os.path.join(repo_root, "harness", "bench", "trial.py")):
            return {"failure": f"the project is not at {repo_root} on Ray node {host}: every node needs it at the "
                               "same path (a shared filesystem or the same image)", "host": host, "gpus": gpus}
        command = [sys.executable, "-c", die_with_parent, str(os.getpid()), "-m", "harness.bench.trial", spec]
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            runner = subprocess.Popen(command, cwd=repo_root, stdout=out, stderr=err)
            try:
                # Polled, not a blocking wait: ray.cancel raises KeyboardInterrupt here only between
                # Python steps, never inside a long system call.
                while runner.poll() is None:
                    time.sleep(0.2)
            except KeyboardInterrupt:  # ray.cancel: ask the trial to stop as Ctrl-C would, then let Ray cancel
                runner.send_signal(signal.SIGINT)
                runner.wait()
                raise
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        try:
            outcome = json.loads(stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            last = (stderr.strip().splitlines() or [f"exit code {runner.returncode}"])[-1]
            return {"failure": f"the trial runner failed on Ray node {host}: {last[:250]}", "host": host, "gpus": gpus}
        outcome.update(host=host, gpus=gpus)
        return outcome

    return run_trial_on_this_node


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, resources: str | None, window: int | None, timeout_s: float,
                 cpu_threads: int | None, announce: Callable[[Job, str], None]):
        ray = self.ray = import_ray()
        self.started_here = not ray.is_initialized()
        if self.started_here:
            try:
                # log_to_driver off: a trial's output belongs in its trial.log, not in this console.
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            except Exception as exc:  # ConnectionError, a bad address, a version mismatch
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise UserError(f"--ray-address {address}: cannot reach a Ray cluster ({first}); start one with "
                                "`ray start --head`, or leave --ray-address out to start a local Ray") from None
        cluster = ray.cluster_resources()
        options = parse_resources(resources)
        if not options:  # a GPU per trial where there are GPUs, else the trial's CPU threads
            options = {"num_cpus": cpu_threads or 1}
            if cluster.get("GPU", 0) >= 1:
                options["num_gpus"] = 1
        asked = _asked(options)
        missing = {k: v for k, v in asked.items() if cluster.get(k, 0) < v}
        if missing:
            name, amount = next(iter(missing.items()))
            raise UserError(f"--executor ray: a trial asks for {amount:g} {name} but the cluster has "
                            f"{cluster.get(name, 0):g} in all; give --ray-resources what its nodes have "
                            f"(it has {', '.join(f'{k} {v:g}' for k, v in sorted(cluster.items()) if not k.startswith('node:'))})")
        fits = min(int(cluster[k] // v) for k, v in asked.items())
        self.capacity = window or max(1, fits)
        self.options = options
        self.timeout_s, self.cpu_threads, self.announce = timeout_s, cpu_threads, announce
        self.task = ray.remote(_trial_task()).options(max_retries=1, retry_exceptions=False, **options)
        self._queue: deque[Job] = deque()
        self._running: dict[Any, Job] = {}

    def describe(self) -> str:
        asked = ", ".join(f"{k} {v:g}" for k, v in _asked(self.options).items())
        return f"Ray tasks ({asked} each), at most {self.capacity} at a time"

    def start(self, jobs: list[Job]) -> None:
        self._queue.extend(jobs)
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._running) < self.capacity:
            job = self._queue.popleft()
            spec = json.dumps({"script": str(job.trial.script), "argv": job.trial.argv,
                               "trial_dir": str(job.trial_dir), "timeout_s": self.timeout_s,
                               "cpu_threads": self.cpu_threads})
            self._running[self.task.remote(str(REPO_ROOT), DIE_WITH_PARENT, spec)] = job
            self.announce(job, "Ray")

    def next_finished(self) -> Finished | None:
        ray = self.ray
        while self._running:
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=0.5)  # short: Ctrl-C stays responsive
            if not ready:
                continue
            job = self._running.pop(ready[0])
            try:
                outcome = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                outcome = not_run(failure=self._why(exc), trial_dir=job.trial_dir)
            if "exit_code" not in outcome:  # the task's own one-line failure (no project on that node, ...)
                outcome = {**not_run(failure=outcome["failure"], trial_dir=job.trial_dir), **outcome}
            self._fill()
            return Finished(job, outcome, self._ran_on(outcome))
        return None

    def _why(self, exc: Exception) -> str:
        exceptions = self.ray.exceptions
        died = (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.OutOfMemoryError,
                exceptions.LocalRayletDiedError)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        if isinstance(exc, died):
            return f"the Ray worker running it died ({type(exc).__name__}), and again on its one retry: {first}"
        return f"Ray could not run it ({type(exc).__name__}: {first})"

    def _ran_on(self, outcome: dict[str, Any]) -> dict[str, Any]:
        gpus = outcome.pop("gpus", None) or []
        return {"executor": self.name, "host": outcome.pop("host", None), "slots": self.capacity,
                "gpu": ",".join(gpus) or None, "resources": self.options}

    def stop(self) -> list[Finished]:
        """Cancel every outstanding task (a running trial is asked to stop as Ctrl-C would; a second
        Ctrl-C kills the workers); they are recorded as interrupted. Queued jobs never start."""
        ray = self.ray
        self._queue.clear()
        refs = list(self._running)
        for ref in refs:
            ray.cancel(ref)
        deadline = time.monotonic() + STOP_GRACE_S + 10
        waiting = refs
        while waiting and time.monotonic() < deadline:
            try:
                _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
            except KeyboardInterrupt:
                for ref in waiting:
                    ray.cancel(ref, force=True)
        stopped = []
        for ref in refs:
            job = self._running.pop(ref)
            outcome = not_run(interrupted=True, trial_dir=job.trial_dir)
            stopped.append(Finished(job, outcome, self._ran_on(outcome)))
        return stopped

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()
