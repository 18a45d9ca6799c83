"""harness.bench spread over several slots: --parallel 2 runs two trials at once with whole, separate
records and logs and resumes after a kill; each --gpus slot sees only its own GPU; --executor ray on a
local Ray (2 CPUs) gives the same scores as the local sweep, retries a dead worker once, and records
the trials a Ctrl-C cancels as interrupted."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import bench
from harness.bench.executors import Job, LocalExecutor, local_slots, parse_gpus
from harness.bench.grid import Trial
from harness.locations import REPO_ROOT
from harness.reporting.runs import RUNS_FILE, read_records

TINY = ["--model", "tiny-qwen2", "--set", "max_samples=40", "--set", "max_seq_length=96",
        "--recipes", "qwen2_7b_qlora", "--ranks", "4,8", "--budget-steps", "4", "--cpu-threads", "1",
        "--no-baseline", "--quiet"]

# A stand-in recipe for the trials that must block, die or report their environment: the sweep reads
# DEFAULTS in-process, the trial process runs __main__ (and starts in a fraction of a second).
STAND_IN = """
DEFAULTS = dict(method="lora")
if __name__ == "__main__":
    import json, os, sys, time
    flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    out, seed = flags["--output_dir"], int(flags["--seed"])
    with open(os.path.join(os.path.dirname(__file__), "attempts.txt"), "a") as attempts:
        attempts.write(f"{seed}\\n")
    if os.path.exists(os.path.join(os.path.dirname(__file__), f"block-{seed}")):
        print("blocking", flush=True)
        time.sleep(120)
    if os.path.exists(os.path.join(os.path.dirname(__file__), "kill-ray-worker")):
        import psutil
        os.kill(psutil.Process(os.getppid()).ppid(), 9)  # recipe <- harness.bench.trial <- the Ray worker
        time.sleep(30)
    os.makedirs(out, exist_ok=True)
    result = {"status": "ok", "device": "cpu stand-in", "eval_loss": float(seed),
              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f)
    print(f"trial of seed {seed} done", flush=True)
"""


def stand_in(folder: Path) -> str:
    path = folder / "standin.py"
    path.write_text(STAND_IN, encoding="utf-8")
    return str(path)


def run_argv(root: Path, *extra: str) -> list[str]:
    return [*extra, "--results-dir", str(root / "results"), "--output-root", str(root / "outputs")]


def overlapping(records) -> bool:
    """Whether the trials' [start, finish] intervals (UTC, 1 s resolution) share a moment."""
    return max(r["started_at"] for r in records) < min(r["finished_at"] for r in records)


def says(folder: Path, seed: int, text: str) -> bool:
    """Whether the trial of this seed under folder has printed text yet."""
    logs = list(folder.glob(f"*-s{seed}/trial.log"))
    return bool(logs) and text in logs[0].read_text(errors="replace")


def no_process_mentions(text: str) -> bool:
    import psutil

    time.sleep(0.5)
    return not [p for p in psutil.process_iter(["cmdline"]) if text in " ".join(p.info["cmdline"] or [])]


# ---------------------------------------------------------------------------- --parallel

@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    code = bench.main(run_argv(root, *TINY, "--parallel", "2", "--name", "par"))
    return root, code, read_records(root / "results" / RUNS_FILE, warn=pytest.fail)


def test_parallel_runs_two_trials_at_once_with_whole_separate_records(parallel_sweep):
    root, code, records = parallel_sweep
    assert code == 0 and [r["status"] for r in records] == ["ok", "ok"]
    assert overlapping(records), [(r["started_at"], r["finished_at"]) for r in records]
    for record in records:
        assert record["ran_on"]["executor"] == "local" and record["ran_on"]["slots"] == 2
        assert record["result"]["trainable_params"] == {"qwen2_7b_qlora-r4-s42": 8192, "qwen2_7b_qlora-r8-s42": 16384}[
            record["trial_id"]]
        # Each trial's console output is in its own log, and only there.
        log = (root / "outputs" / "par" / record["trial_id"] / "trial.log").read_text()
        others = [r["trial_id"] for r in records if r is not record]
        assert f"par/{record['trial_id']}/run" in log and not any(f"par/{o}/" in log for o in others)
    table = (root / "results" / "par.md").read_text()
    assert "2 at a time on the CPU (`--parallel 2`)" in table


def test_parallel_sweep_killed_outright_resumes_where_it_stopped(tmp_path):
    recipe = stand_in(tmp_path)
    (tmp_path / "block-2").touch()
    argv = run_argv(tmp_path, "--recipes", recipe, "--seeds", "1,2,3", "--parallel", "2", "--no-baseline",
                    "--name", "resumed")
    sweep = subprocess.Popen([sys.executable, "-m", "harness.bench", *argv], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    runs = tmp_path / "results" / RUNS_FILE
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # seeds 1 and 3 recorded, seed 2 blocking in the other slot
        if len(read_records(runs)) == 2 and says(tmp_path / "outputs" / "resumed", 2, "blocking"):
            break
        assert sweep.poll() is None, sweep.stderr.read().decode()
        time.sleep(0.2)
    os.kill(sweep.pid, signal.SIGKILL)
    sweep.wait(timeout=60)
    first = read_records(runs, warn=pytest.fail)
    assert sorted(r["seed"] for r in first) == [1, 3] and all(r["status"] == "ok" for r in first)
    assert no_process_mentions(str(tmp_path / "outputs")), "a trial outlived its killed sweep"

    (tmp_path / "block-2").unlink()
    assert bench.main(argv) == 0
    records = read_records(runs, warn=pytest.fail)
    assert sorted(r["seed"] for r in records) == [1, 2, 3]  # only the unfinished trial ran again
    assert (tmp_path / "attempts.txt").read_text().split().count("1") == 1


def test_each_gpu_slot_sees_only_its_own_gpu(tmp_path):
    """--gpus pinning, checked without a GPU: the executor gives each trial its slot's CUDA_VISIBLE_DEVICES
    (the stand-in records what it saw) and the record names that GPU."""
    recipe = Path(stand_in(tmp_path))
    slots = local_slots(None, ["5", "7"])
    assert [s.env for s in slots] == [{"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": g} for g in "57"]
    executor = LocalExecutor(slots, timeout_s=120, cpu_threads=1, echo=False, announce=lambda job, where: None)
    jobs = [Job(seed, Trial("standin", recipe, "lora", "m", None, seed, {}, ["--seed", str(seed)]),
                tmp_path / f"trial{seed}") for seed in (1, 2, 3, 4)]
    executor.start(jobs)
    finished = []
    while (one := executor.next_finished()) is not None:
        finished.append(one)
    assert len(finished) == 4
    for one in finished:
        assert one.outcome["result"]["cuda_visible_devices"] == one.ran_on["gpu"] in ("5", "7")


def test_gpus_on_a_machine_without_one_is_refused_in_one_line():
    from harness.bench.executors import gpu_count
    from harness.errors import UserError

    if gpu_count():
        pytest.skip("this machine has a GPU: --gpus 0 is valid here")
    with pytest.raises(UserError, match="no NVIDIA GPU.*use --parallel N"):
        parse_gpus("0")


def test_the_table_names_the_gpu_and_host_a_trial_ran_on():
    from harness.reporting.tables import device_label, failures_table

    record = {"result": {"device": "cuda:0 NVIDIA H100 80GB HBM3"}, "ran_on": {"executor": "local", "gpu": "3"}}
    assert device_label(record) == "GPU 3: NVIDIA H100 80GB HBM3"
    on_ray = {"result": {"device": "cuda:0 NVIDIA A10G"}, "ran_on": {"executor": "ray", "gpu": "1", "host": "node-b"}}
    assert device_label(on_ray) == "node-b: GPU 1: NVIDIA A10G"
    failed = {"trial_id": "t", "status": "failed", "reason": "x", **on_ray}
    assert failures_table([failed])["ran on"].tolist() == ["node-b GPU 1"]


# ---------------------------------------------------------------------------- --executor ray

@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    import logging

    context = ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray, context.address_info["address"]
    ray.shutdown()


def test_ray_sweep_gives_the_same_table_as_the_local_one(local_ray, parallel_sweep, tmp_path):
    from harness.bench.executor_timing import comparable_rows

    _, _, local_records = parallel_sweep
    assert bench.main(run_argv(tmp_path, *TINY, "--executor", "ray", "--name", "par")) == 0
    ray_records = read_records(tmp_path / "results" / RUNS_FILE, warn=pytest.fail)
    assert all(r["ran_on"]["executor"] == "ray" and r["ran_on"]["host"] == socket.gethostname() for r in ray_records)
    assert overlapping(ray_records)  # the 2-CPU Ray ran both at once
    # Everything but timings, memory and the device's name (a Ray trial's names its host): the same rows,
    # the same losses, scores and parameter counts.
    rows = comparable_rows(ray_records)
    assert len(rows) == 2 and rows == comparable_rows(local_records)
    assert "as Ray tasks (`--executor ray`), up to 2 at a time" in (tmp_path / "results" / "par.md").read_text()


def test_ray_retries_a_dead_worker_once_then_records_the_trial_failed(local_ray, tmp_path):
    recipe = stand_in(tmp_path)
    (tmp_path / "kill-ray-worker").touch()
    argv = run_argv(tmp_path, "--recipes", recipe, "--executor", "ray", "--no-baseline", "--quiet")
    assert bench.main(argv) == 1
    (record,) = read_records(tmp_path / "results" / RUNS_FILE, warn=pytest.fail)
    assert record["status"] == "failed" and "Ray worker running it died" in record["reason"], record["reason"]
    assert record["wall_seconds"] is None  # not measured, not made up
    assert (tmp_path / "attempts.txt").read_text().split() == ["42", "42"]  # the first try and one retry


# SIGTERM too: ray.init installs its own SIGTERM handler (sys.exit(15)), which would end the sweep without
# recording its trials; the sweep keeps its own.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_the_ray_tasks_and_records_them_interrupted(sig, local_ray, tmp_path, interruptible):
    _, address = local_ray
    recipe = stand_in(tmp_path)
    for seed in (1, 2):
        (tmp_path / f"block-{seed}").touch()
    argv = run_argv(tmp_path, "--recipes", recipe, "--seeds", "1,2", "--executor", "ray", "--ray-address", address,
                    "--no-baseline", "--name", "cancelled")
    sweep = subprocess.Popen([sys.executable, "-m", "harness.bench", *argv], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **interruptible)
    deadline = time.monotonic() + 300
    while not all(says(tmp_path / "outputs" / "cancelled", seed, "blocking") for seed in (1, 2)):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stderr.read().decode()
        time.sleep(0.2)
    os.kill(sweep.pid, sig)
    _, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 130, err.decode()[-2000:]
    records = read_records(tmp_path / "results" / RUNS_FILE, warn=pytest.fail)
    assert sorted(r["seed"] for r in records) == [1, 2] and {r["status"] for r in records} == {"interrupted"}
    assert no_process_mentions(str(tmp_path / "outputs")), "a trial outlived its cancelled task"


def test_ray_without_room_for_a_trial_is_one_line(local_ray, tmp_path, capsys):
    recipe = stand_in(tmp_path)
    argv = run_argv(tmp_path, "--recipes", recipe, "--executor", "ray", "--ray-resources", "num_gpus=1", "--no-baseline")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "asks for 1 GPU but the cluster has 0" in err[0], err
    assert not (tmp_path / "results" / RUNS_FILE).exists()


def test_ray_not_installed_is_one_line_saying_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is not installed
    argv = run_argv(tmp_path, "--recipes", stand_in(tmp_path), "--executor", "ray", "--no-baseline")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["bench: --executor ray needs Ray, which is not installed here: "
                   'pip install -e ".[ray]" (an optional extra)'], err
    assert not (tmp_path / "results" / RUNS_FILE).exists()


def test_ray_resources_are_parsed_into_task_options():
    from harness.bench.executors import parse_resources
    from harness.errors import UserError

    assert parse_resources("num_gpus=1,num_cpus=4,A100=1") == {"num_gpus": 1.0, "num_cpus": 4.0,
                                                                "resources": {"A100": 1.0}}
    with pytest.raises(UserError, match="write NAME=AMOUNT"):
        parse_resources("num_gpus=lots")
    assert json.dumps(parse_resources(None)) == "{}"
