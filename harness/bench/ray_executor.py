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
leaves nothing queued. A cluster that does not accept the sweep within --ray-connect-timeout seconds
(30 by default) is refused in one line, and SIGTERM or Ctrl-C while waiting for it stops the sweep.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections import deque
from typing import Any, Callable

from harness.bench.executors import Finished, Job, parse_resources
from harness.bench.trial import DIE_WITH_PARENT, STOP_GRACE_S, die_with_parent, not_run
from harness.errors import Terminated, UserError
from harness.locations import REPO_ROOT

INSTALL_HINT = 'pip install -e ".[ray]" (an optional extra)'


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


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


# Connecting to a cluster that is not there, ray.init retries for many minutes (20 attempts of ~35 s),
# inside native code that holds back Python's signal handlers, and logs a warning every 5 s. So the
# connection is first tried by this small process, which can be given a deadline, stopped on SIGTERM or
# Ctrl-C, and whose noise stays in its pipe; this process connects only once that one has. Its last
# stdout line says why a connection failed.
CONNECT_PROBE = """
import logging, sys
import ray
try:
    ray.init(address=sys.argv[1] or None, logging_level=logging.ERROR, log_to_driver=False)
except Exception as exc:
    print((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200], flush=True)
    sys.exit(1)
ray.shutdown()
"""
DEFAULT_CONNECT_TIMEOUT_S = 30.0


def connects_to_a_cluster(address: str | None) -> bool:
    """Whether ray.init(address) joins a running cluster (which may not answer) rather than starting a
    new Ray on this machine (RAY_ADDRESS stands in for a missing address, as ray.init reads it)."""
    return (address or os.environ.get("RAY_ADDRESS") or "local") != "local"


def wait_for_cluster(address: str | None, timeout_s: float) -> None:
    """Refuse in one line a cluster that does not accept a driver within timeout_s seconds."""
    shown = address or f"(RAY_ADDRESS={os.environ.get('RAY_ADDRESS')})"
    print(f"Connecting to the Ray cluster at {shown} (up to {timeout_s:g} s, --ray-connect-timeout)", flush=True)
    probe = subprocess.Popen(die_with_parent(["-c", CONNECT_PROBE, address or ""]), cwd=REPO_ROOT,
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while probe.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # Ctrl-C and SIGTERM are heard here, between sleeps
        timed_out = probe.poll() is None
    finally:
        if probe.poll() is None:
            probe.kill()
            probe.wait()
    why = (probe.stdout.read().decode(errors="replace").strip().splitlines() or [""])[-1]
    probe.stdout.close()
    if timed_out:
        raise UserError(f"--ray-address {shown}: no Ray cluster answered within {timeout_s:g} s; check the address "
                        "and that the cluster is up (`ray start --head` starts one), raise --ray-connect-timeout for "
                        "a slow one, or leave --ray-address out to start a local Ray")
    if probe.returncode != 0:
        why = why or f"exit code {probe.returncode}"
        raise UserError(f"--ray-address {shown}: cannot reach a Ray cluster ({why}); start one with "
                        "`ray start --head`, or leave --ray-address out to start a local Ray")


def init_ray(ray, address: str | None) -> None:
    """ray.init, keeping this process's SIGTERM handling: ray.init replaces the handler with sys.exit(15),
    which would end a sweep without recording its running trials as interrupted."""
    ours = signal.getsignal(signal.SIGTERM)
    try:
        # log_to_driver off: a trial's output belongs in its trial.log, not in this console.
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except SystemExit as exc:  # ray's handler, for a SIGTERM during ray.init
        if exc.code == signal.SIGTERM:
            raise Terminated() from None
        raise
    except Exception as exc:  # ConnectionError, a bad address, a version mismatch
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--ray-address {address}: cannot reach a Ray cluster ({first}); start one with "
                        "`ray start --head`, or leave --ray-address out to start a local Ray") from None
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, resources: str | None, window: int | None, timeout_s: float,
                 cpu_threads: int | None, announce: Callable[[Job, str], None],
                 connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S):
        ray = self.ray = import_ray()
        self.started_here = not ray.is_initialized()
        if self.started_here:
            if connects_to_a_cluster(address):
                wait_for_cluster(address, connect_timeout_s)
            init_ray(ray, address)
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
