"""Faults around harness.bench, harness.plan and harness.report, each in the process shape it happens in:
an unreachable Ray cluster is refused in one line within its bound and SIGTERM ends the wait; a second
sweep of the same trials is refused while the first runs (the lock dies with its holder); a file given as
a recipe is read, never run; impossible model sizes and wrong-typed records are one line or one skipped
line, never a traceback; GPU memory is this process's own where NVML can tell; the test set-up makes no
cache folder it does not use."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import bench
from harness.bench.recipe_file import read_defaults
from harness.errors import UserError
from harness.locations import RECIPES_DIR, REPO_ROOT
from harness.reporting import page as report
from harness.reporting.runs import RUNS_FILE, TRIAL_SCHEMA, read_records, trial_record_problem

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

# A stand-in recipe: DEFAULTS is all the sweep reads; the trial process runs __main__, blocking while a
# file named block sits beside it, and counting its starts in attempts.txt.
STAND_IN = """
DEFAULTS = dict(method="lora")
if __name__ == "__main__":
    import json, os, sys, time
    here = os.path.dirname(os.path.abspath(__file__))
    flags = dict(zip(sys.argv[1::2], sys.argv[2::2]))
    with open(os.path.join(here, "attempts.txt"), "a") as attempts:
        attempts.write(flags["--seed"] + "\\n")
    print("started", flush=True)
    while os.path.exists(os.path.join(here, "block")):
        time.sleep(0.1)
    os.makedirs(flags["--output_dir"], exist_ok=True)
    with open(os.path.join(flags["--output_dir"], "result.json"), "w") as f:
        json.dump({"status": "ok", "device": "cpu stand-in", "eval_loss": 1.0}, f)
"""


def bench_command(root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "harness.bench", *extra, "--results-dir", str(root / "results"),
            "--output-root", str(root / "outputs")]


def wait_for_line(process: subprocess.Popen, start: str, limit_s: float = 300) -> None:
    """Read the process's stdout until a line starting with `start` (each line read is one the process
    printed: the wait ends the moment it does)."""
    deadline = time.monotonic() + limit_s
    for line in process.stdout:
        if line.startswith(start):
            return
        assert time.monotonic() < deadline, f"no line starting {start!r} within {limit_s} s"
    pytest.fail(f"the process ended (code {process.wait()}) without printing {start!r}: {process.stderr.read()}")


# ---------------------------------------------------------------------------- Ray: bounded, and SIGTERM

def test_an_unreachable_ray_cluster_is_one_line_within_the_bound(tmp_path):
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    recipe = tmp_path / "standin.py"
    recipe.write_text(STAND_IN)
    sweep = subprocess.Popen(bench_command(tmp_path, "--recipes", str(recipe), "--no-baseline", "--executor", "ray",
                                           "--ray-address", "127.0.0.1:1", "--ray-connect-timeout", "3"),
                             cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_line(sweep, "Connecting to the Ray cluster at 127.0.0.1:1 (up to 3 s")
    connecting = time.monotonic()
    _, err = sweep.communicate(timeout=120)
    waited = time.monotonic() - connecting
    assert sweep.returncode == 2, err
    assert err.splitlines() == [
        "bench: --ray-address 127.0.0.1:1: no Ray cluster answered within 3 s; check the address and that the "
        "cluster is up (`ray start --head` starts one), raise --ray-connect-timeout for a slow one, or leave "
        "--ray-address out to start a local Ray"], err
    assert 3 <= waited < 3 + 15  # the bound, plus the exit; before, ray.init tried for many minutes
    assert not (tmp_path / "results" / RUNS_FILE).exists() and not (tmp_path / "attempts.txt").exists()


def test_the_ray_connection_bound_defaults_to_30_s_and_must_be_positive(tmp_path, capsys):
    assert bench.build_parser().parse_args([]).ray_connect_timeout == 30
    for bad in ("0", "nan", "-1"):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--executor", "ray", "--ray-connect-timeout", bad, "--dry-run",
                        "--results-dir", str(tmp_path / "r"), "--output-root", str(tmp_path / "o")])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            f"bench: --ray-connect-timeout must be a positive number of seconds, got {float(bad)}"]


def test_sigterm_while_connecting_to_ray_stops_the_sweep_at_once(tmp_path):
    pytest.importorskip("ray", reason='Ray is an optional extra: pip install -e ".[ray]"')
    recipe = tmp_path / "standin.py"
    recipe.write_text(STAND_IN)
    sweep = subprocess.Popen(bench_command(tmp_path, "--recipes", str(recipe), "--no-baseline", "--executor", "ray",
                                           "--ray-address", "127.0.0.1:1", "--ray-connect-timeout", "300"),
                             cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for_line(sweep, "Connecting to the Ray cluster")
        time.sleep(2)  # well inside the connection attempt
        stopped = time.monotonic()
        sweep.send_signal(signal.SIGTERM)
        _, err = sweep.communicate(timeout=60)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    assert sweep.returncode == 130, err
    assert err.splitlines() == ["bench: stopped by SIGTERM; files already written are kept"], err
    assert time.monotonic() - stopped < 30  # before, ray.init held the signal back for minutes
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the connection attempt went with it
        os.killpg(sweep.pid, 0)


def test_bad_ray_resources_are_refused_by_the_argument_check():
    from harness.bench.executors import parse_resources

    for text in ("garbage", "num_gpus=nan", "num_cpus=inf", "num_gpus=-1", "=1"):
        with pytest.raises(UserError, match="write NAME=AMOUNT with a number >= 0"):
            parse_resources(text)


# ---------------------------------------------------------------------------- two sweeps, one folder

def test_a_second_sweep_of_the_same_trials_is_refused_while_the_first_runs(tmp_path):
    recipe = tmp_path / "standin.py"
    recipe.write_text(STAND_IN)
    (tmp_path / "block").touch()
    command = bench_command(tmp_path, "--recipes", str(recipe), "--no-baseline", "--name", "twice", "--quiet")
    first = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_for_line(first, "[1/1]")  # its trial is starting
        deadline = time.monotonic() + 120
        while not (tmp_path / "attempts.txt").exists():
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.1)
        second = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.splitlines() == [
            f"bench: sweep twice is already running (process {first.pid}) with its trials in "
            f"{tmp_path / 'outputs' / 'twice'}; wait for it to finish (rerunning then resumes it), or give this "
            "sweep another --name"], second.stderr
        assert (tmp_path / "attempts.txt").read_text().split() == ["42"]  # the trial was not started twice
        assert not (tmp_path / "results" / RUNS_FILE).exists()  # and no failure was recorded for it
    finally:
        (tmp_path / "block").unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    (record,) = read_records(tmp_path / "results" / RUNS_FILE, warn=pytest.fail)
    assert record["status"] == "ok"
    # the lock went with the first sweep: the same command now runs, and finds the trial done
    again = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already recorded ok, skipped" in again.stdout, again.stderr


def test_the_sweep_lock_is_released_when_its_holder_is_killed(tmp_path):
    from harness.bench.sweep import sweep_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from harness.bench.sweep import sweep_lock\nwith sweep_lock(Path(sys.argv[1]), 'held'):\n"
         "    print('held', flush=True)\n    time.sleep(300)\n", str(tmp_path)], cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"sweep held is already running \(process {holder.pid}\)"):
            with sweep_lock(tmp_path, "held"):
                pass
    finally:
        holder.kill()  # kill -9: no Python cleanup runs
        holder.wait()
    with sweep_lock(tmp_path, "held"):
        assert (tmp_path / ".sweep.lock").read_text().strip() == str(os.getpid())


# ---------------------------------------------------------------------------- a recipe file is read, not run

@pytest.mark.parametrize("tool", ["plan", "bench"])
def test_a_file_given_as_a_recipe_is_never_run(tool, tmp_path):
    marker = tmp_path / "ran"
    stray = tmp_path / "stray.py"
    stray.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    command = ([sys.executable, "-m", "harness.plan", str(stray)] if tool == "plan"
               else bench_command(tmp_path, "--recipes", str(stray), "--dry-run"))
    done = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == [
        f"{tool}: {stray} is not a recipe of this project: it has no module-level DEFAULTS (read without running "
        "the file); pass a recipe from recipes/ or a file written like them"], done.stderr
    assert not marker.exists()
    # a recipe whose import would do something: its DEFAULTS is read, its code is not run
    stray.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nDEFAULTS = dict(method='lora')\n")
    listed = subprocess.run(bench_command(tmp_path, "--recipes", str(stray), "--dry-run", "--model", "stories260k",
                                          "--no-baseline"), cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0 and "[1/1] stray-" in listed.stdout, listed.stderr
    assert not marker.exists()


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_every_recipes_defaults_read_without_running_it_are_those_it_runs_with(path):
    from harness.run.flow import load_recipe

    assert read_defaults(path) == load_recipe(path).DEFAULTS


@pytest.mark.parametrize("source, why", [
    ("DEFAULTS = make_defaults()", "a call of 'make_defaults'"),
    ("import os\nDEFAULTS = dict(r=os.cpu_count())", "a call of 'os.cpu_count'"),
    ("from os import environ\nDEFAULTS = dict(**environ)", "comes from os, not from this project"),
    ("DEFAULTS = dict(r=8)\nDEFAULTS['r'] = 16", "changes DEFAULTS after assigning it (line 2)"),
    ("DEFAULTS = dict(r=8)\nDEFAULTS.update(r=16)", "changes DEFAULTS after assigning it (line 2)"),
    ("DEFAULTS = dict(r=8)\nif True:\n    DEFAULTS = dict(r=16)", "assigns DEFAULTS twice (line 2)"),
    ("R = 4\nR = R * 2\nDEFAULTS = dict(r=R)", "is not a literal"),
    ("DEFAULTS = [1, 2]", "is not a dict of setting names"),
    ("DEFAULTS = dict(r=8", "is not valid Python (line 1"),
])
def test_defaults_only_running_the_file_could_give_are_refused(source, why, tmp_path):
    path = tmp_path / "odd.py"
    path.write_text(source)
    with pytest.raises(UserError, match="pass a recipe from recipes/|write DEFAULTS as the recipes") as refused:
        read_defaults(path)
    assert why in str(refused.value)


def test_defaults_written_like_the_recipes_are_read(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from harness.run.presets import OPT_350M as BASE\nLORA = dict(r=8, lora_alpha=16)\n"
                    "DEFAULTS = dict(**BASE, **LORA, target_modules='all-linear') | {'learning_rate': -1e-4, "
                    "'labels': ('a', 'b')}\nif __name__ == '__main__':\n    raise SystemExit('not run')\n")
    from harness.run.presets import OPT_350M

    assert read_defaults(path) == {**OPT_350M, "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                   "learning_rate": -1e-4, "labels": ("a", "b")}


# ---------------------------------------------------------------------------- plan: impossible sizes

@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 0}, "hidden_size is 0, and every size must be a whole number >= 1"),
    ({"vocab_size": -1}, "vocab_size is -1, and every size must be a whole number >= 1"),
    ({"intermediate_size": 1.5}, "Field 'intermediate_size' expected int, got float"),  # transformers' own check
    ({"num_hidden_layers": -2}, "num_hidden_layers is -2"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5}, "not a multiple of the number of attention heads (5)"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
])
def test_a_model_of_impossible_sizes_is_one_line(change, message, tmp_path, capsys):
    from harness.plan.cli import main

    config = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=100, max_position_embeddings=128)
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(tmp_path), "--ranks", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"plan: model '{tmp_path}' has an impossible config") and message in err, err
    assert err.rstrip().endswith("fix its config.json or pass another --model")


# ---------------------------------------------------------------------------- report: wrong types

GOOD = {
    "schema": 1, "sweep": "s", "trial_id": "t1", "trial_hash": "h1", "status": "ok", "reason": None,
    "recipe": "qwen2_7b_qlora", "method": "lora", "model": "tiny-qwen2", "rank": 4, "rank_setting": {"r": 4},
    "seed": 42, "axes": {"learning_rate": "1e-4"}, "scored_on": "{}",
    "budgets": {"steps": 2, "seconds": None, "tokens": None, "memory_gb": 1.0, "trial_timeout_s": 600.0},
    "cpu_threads": 1, "ran_on": {"executor": "local", "host": "h", "slots": 1, "gpu": None},
    "exit_code": 0, "wall_seconds": 3.5, "process_peak_rss_mb": 500.0, "started_at": "2025-01-01T00:00:00Z",
    "finished_at": "2025-01-01T00:00:04Z", "error_tail": None, "mfu_percent": None,
    "bench_command": "python -m harness.bench", "trial_command": "python recipes/x.py", "trial_dir": "outputs/t1",
    "result": {
        "device": "cuda:0 NVIDIA H100 80GB HBM3", "peak_memory_mb": 100.0, "peak_memory_kind": "cuda_reserved",
        "cuda_reserved_mb": 100.0, "cuda_allocated_mb": 90.0, "nvml_used_mb": 300.0, "nvml_used_source": "process",
        "train_seconds": 1.0, "total_seconds": 2.0, "tokens_per_second": 1000.0, "trainable_params": 1000,
        "trainable_percent": 0.1, "total_params": 10**6, "adapter_bytes": 4096, "model_bytes": None,
        "train_loss": 2.0, "eval_loss": 2.1, "global_step": 2, "stopped_by": "max_steps", "quantization": "4bit",
        "method": "lora", "memory_budget_enforced": "cuda_allocator",
        "memory_plan": {"planned_peak_mb": 120.0, "cuda_context_mb": 10.0}, "forgetting": {"delta": 0.1},
        "eval": {"accuracy": 0.5, "accuracy_se": 0.1, "examples": 10}, "config": {"max_steps": 2, "r": 4},
        "git": {"commit": "abc", "dirty": False}, "versions": {"torch": "2"},
    },
}


def field_paths(schema: dict, prefix: tuple = ()) -> list[tuple]:
    paths = []
    for key, kind in schema.items():
        paths.append((*prefix, key))
        if isinstance(kind, dict):
            paths += field_paths(kind, (*prefix, key))
    return paths


FIELDS = field_paths(TRIAL_SCHEMA)


def with_value(path: tuple, value) -> dict:
    record = copy.deepcopy(GOOD)
    record.update(trial_id="t2", trial_hash="h2", seed=7)
    holder = record
    for key in path[:-1]:
        holder = holder[key]
    holder[path[-1]] = value
    return record


def report_on(folder: Path, lines: list[dict]) -> tuple[int, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RUNS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = report.main(["--results-dir", str(folder)])
    return code, err.getvalue()


@pytest.mark.parametrize("path", FIELDS, ids=".".join)
def test_a_line_with_a_wrong_type_is_skipped_naming_the_line_and_the_field(path, tmp_path):
    warnings = []  # a list is none of the kinds a field has (text, numbers, an object)
    kept = read_records(write_lines(tmp_path, [GOOD, with_value(path, ["a", "list"])]), warn=warnings.append,
                        check=trial_record_problem)
    assert kept == [GOOD]
    (warning,) = warnings
    assert "line 2 is not a trial record as harness.bench writes it" in warning
    assert f"its {'.'.join(path)} is [\"a\", \"list\"], not " in warning


def test_the_report_of_a_folder_with_a_wrong_typed_line_is_written_from_the_others(tmp_path):
    code, err = report_on(tmp_path, [GOOD, with_value(("result", "peak_memory_mb"), "12 MiB"),
                                     with_value(("trial_hash",), ["h", 2])])
    assert code == 0
    assert err.splitlines() == [
        f"warning: {tmp_path / RUNS_FILE}: line 2 is not a trial record as harness.bench writes it (its "
        "result.peak_memory_mb is \"12 MiB\", not a number); skipped, the rest is kept",
        f"warning: {tmp_path / RUNS_FILE}: line 3 is not a trial record as harness.bench writes it (its "
        "trial_hash is [\"h\", 2], not text); skipped, the rest is kept"]
    table = (tmp_path / "s.md").read_text()
    assert "1 of 1 trials ok" in table and "| process" in table


def write_lines(folder: Path, lines: list[dict]) -> Path:
    (folder / RUNS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / RUNS_FILE


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))  # ~2 s each: plots are drawn
@given(path=st.sampled_from(FIELDS), value=JSON)
def test_any_json_value_in_any_field_never_breaks_the_report(path, value, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    record = with_value(path, value)
    code, err = report_on(folder, [GOOD, record])
    assert code == 0
    skipped = trial_record_problem(record) is not None
    assert ("line 2 is not a trial record" in err) == skipped, err
    assert (folder / "s.md").is_file()


# ---------------------------------------------------------------------------- GPU memory: this process's own

class FakeNvml:
    """pynvml's calls NvmlPeakSampler makes, answering for a GPU that another process shares with this one."""

    class NVMLError(Exception):
        pass

    def __init__(self, processes):
        self.processes = processes

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return f"gpu{index}"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return type("Memory", (), {"used": 10 * 2**30})()  # both processes, and the driver's own share

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        if isinstance(self.processes, Exception):
            raise self.processes
        return [type("Process", (), {"pid": pid, "usedGpuMemory": used})() for pid, used in self.processes]


@pytest.mark.parametrize("processes, peak, source", [
    ([(1, 6 * 2**30), ("me", 3 * 2**30)], 3 * 2**30, "process"),  # the other trial's 6 GiB are not ours
    ([(1, 6 * 2**30), (2, 3 * 2**30)], 10 * 2**30, "device"),  # a container: NVML's pids are the host's
    ([(1, 6 * 2**30), ("me", None)], 10 * 2**30, "device"),  # NVML cannot measure the process here
    (FakeNvml.NVMLError("not supported"), 10 * 2**30, "device"),
])
def test_nvml_memory_is_this_processs_own_where_nvml_can_tell(processes, peak, source, monkeypatch):
    from harness.run.measure import NvmlPeakSampler

    if isinstance(processes, list):
        processes = [(os.getpid() if pid == "me" else pid, used) for pid, used in processes]
    fake = FakeNvml(processes)
    fake.NVMLError = FakeNvml.NVMLError
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # no GPU here: NVML's index 0 is the one
    sampler = NvmlPeakSampler(0, interval_s=0.01)
    sampler.sample()
    assert sampler.stop() == (peak, source)


def test_the_table_says_whose_memory_the_nvml_peak_is():
    from harness.reporting.tables import trial_row

    assert trial_row(GOOD)["NVML of"] == "process"
    older = copy.deepcopy(GOOD)
    del older["result"]["nvml_used_source"]  # recorded before the per-process query: the whole GPU's
    assert trial_row(older)["NVML of"] == "device"
    assert trial_row({**GOOD, "result": {}})["NVML of"] is None


# ---------------------------------------------------------------------------- the test set-up itself

@pytest.mark.parametrize("given_cache", [True, False])
def test_the_test_set_up_makes_a_cache_folder_only_when_none_is_given(given_cache, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    env.pop("FT_COOKBOOK_CACHE", None)
    if given_cache:
        env["FT_COOKBOOK_CACHE"] = str(tmp_path / "my-cache")
    done = subprocess.run([sys.executable, "-c", "import runpy, sys, os; runpy.run_path(sys.argv[1]); "
                           "print(os.environ['FT_COOKBOOK_CACHE'])", str(Path(__file__).with_name("conftest.py"))],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    made = [p.name for p in temp.iterdir()]
    if given_cache:
        assert made == [] and done.stdout.strip() == str(tmp_path / "my-cache")
    else:
        assert len(made) == 1 and made[0].startswith("ft-cookbook-test-models-")
        assert done.stdout.strip() == str(temp / made[0])


def test_float_fields_of_the_schema_take_nan_and_inf_as_numbers():
    # json.loads reads NaN and Infinity; the tables show them (blank for nan), so they are not skipped
    for value in (math.nan, math.inf):
        assert trial_record_problem(with_value(("result", "eval_loss"), value)) is None
