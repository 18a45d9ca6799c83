"""harness.bench / harness.report on a tiny model: a real 2 recipes x 2 ranks sweep fills its table,
trainable parameters follow LoRA's closed form, failures, budgets and timeouts are recorded, a rerun
skips finished trials, an interrupted sweep leaves runs.jsonl valid, and the report is reproducible."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from harness import bench
from harness.locations import REPO_ROOT
from harness.reporting import page as report
from harness.reporting import tables
from harness.reporting.runs import RUNS_FILE, append_record, read_records

TINY = [
    "--model", "tiny-qwen2",
    "--set", "max_samples=40", "--set", "max_seq_length=96", "--set", "gradient_accumulation_steps=2",
    "--cpu-threads", "1", "--quiet",
]


def sweep_argv(root: Path, *extra: str) -> list[str]:
    return [*TINY, *extra, "--results-dir", str(root / "results"), "--output-root", str(root / "outputs")]


# Stand-in recipes for the trials that must go wrong: the sweep reads DEFAULTS in-process, the trial
# process runs __main__. They start in a fraction of a second, unlike a real recipe.
FAILING_RECIPE = """
DEFAULTS = dict(method="lora")
if __name__ == "__main__":
    raise RuntimeError("deliberate failure for the test")
"""
SLEEPING_RECIPE = """
DEFAULTS = dict(method="lora")
if __name__ == "__main__":
    import time
    print("sleeping", flush=True)
    time.sleep(120)
"""


def write_recipe(folder: Path, name: str, text: str) -> str:
    path = folder / f"{name}.py"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep shared by several tests: 2 recipes x 2 ranks (plus a recipe that always fails),
    each trial stopped by a 0.5 s training budget long before its 1000 steps."""
    root = tmp_path_factory.mktemp("bench")
    failing = write_recipe(root, "failing", FAILING_RECIPE)
    argv = sweep_argv(root, "--recipes", f"qwen2_7b_adalora,qwen2_7b_qlora,{failing}", "--ranks", "4,8",
                      "--budget-steps", "1000", "--budget-seconds", "0.5", "--name", "tiny", "--no-baseline")
    code = bench.main(argv)
    results = root / "results"
    return SimpleNamespace(root=root, argv=argv, code=code, results=results,
                           records=read_records(results / RUNS_FILE), table=results / "tiny.md")


def markdown_table(text: str, heading: str) -> list[list[str]]:
    """Rows (header first) of the first table after a heading."""
    lines = text.split(f"{heading}\n", 1)[1].splitlines()
    rows = []
    for line in lines:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif rows:
            break
    return [rows[0], *rows[2:]]  # drop the |---| line


def column_of(head, body, name):
    return [row[head.index(name)] for row in body]


def test_sweep_fills_every_column_with_measured_values(sweep):
    assert sweep.code == 1  # not every trial finished ok
    assert [(r["recipe"], r["rank"], r["status"]) for r in sweep.records] == [
        ("qwen2_7b_adalora", 4, "ok"), ("qwen2_7b_adalora", 8, "ok"),
        ("qwen2_7b_qlora", 4, "ok"), ("qwen2_7b_qlora", 8, "ok"),
        ("failing", 4, "failed"), ("failing", 8, "failed"),
    ]
    for record in sweep.records[:4]:
        result = record["result"]
        assert result["status"] == "ok" and result["config"]["max_steps"] == 1000
        # the time budget stopped training, and the record says so
        assert result["stopped_by"] == "budget_seconds" and 0 < result["global_step"] < 1000
        assert result["train_seconds"] >= 0.5 and record["budgets"]["seconds"] == 0.5
        assert result["config"]["data_seed"] == 42
        # wait4's view of the child and the recipe's own ru_maxrss measure the same process
        assert record["process_peak_rss_mb"] >= result["cpu_rss_mb"] > 100
        assert record["mfu_percent"] is None  # CPU: blank, not 0
        assert len(record["trial_hash"]) == 16 and record["bench_command"].startswith("python -m harness.bench")
    for record in sweep.records[4:]:
        assert record["result"] is None and record["exit_code"] == 1
        assert record["reason"] == "RuntimeError: deliberate failure for the test"
    assert sweep.records[0]["rank_setting"] == {"target_r": 4, "init_r": 12}
    assert sweep.records[3]["rank_setting"] == {"r": 8}

    text = sweep.table.read_text(encoding="utf-8")
    assert "**CPU run**" in text and "**random weights**" in text and "tiny-qwen2" in text
    assert "python -m harness.bench --model tiny-qwen2" in text
    assert sweep.records[0]["result"]["git"]["commit"] in text
    rows = markdown_table(text, "## Comparison")
    head, body = rows[0], rows[1:]
    for column in ("recipe", "method", tables.RANK_HEADER, "seeds", "peak memory (MiB)", "memory kind",
                   "trial process peak RSS (MiB)", "train (s)", "total (s)", "tokens/s", "trainable params",
                   "trainable (%)", "adapter (MiB)", "train loss", "eval loss", "eval accuracy", "eval macro F1",
                   "steps", "stopped by"):
        assert column in head
    assert "MFU (%)" not in head and "CUDA reserved (MiB)" not in head  # not measurable on CPU: no column
    assert len(body) == 4 and set(column_of(head, body, "stopped by")) == {"budget_seconds"}
    for row in body:
        assert all(cell and cell.lower() != "nan" for cell in row), row
    column = dict(zip(head, zip(*body)))
    assert column[tables.RANK_HEADER] == ("target_r 4 ← init_r 12", "target_r 8 ← init_r 24", "r 4", "r 8")
    assert set(column["memory kind"]) == {"cpu_rss"}
    assert all(float(v) > 0 for v in column["train (s)"] + column["tokens/s"] + column["peak memory (MiB)"])

    pivot = markdown_table(text, "### trainable params")
    assert pivot[0] == ["recipe", "rank 4", "rank 8"] and len(pivot) == 3
    failures = markdown_table(text, "## Trials that did not finish ok")
    assert [row[:3] for row in failures[1:]] == [
        ["failing-r4-s42", "failed", "RuntimeError: deliberate failure for the test"],
        ["failing-r8-s42", "failed", "RuntimeError: deliberate failure for the test"],
    ]
    for name in ("rank_vs_memory", "rank_vs_train_time", "rank_vs_score", "memory_vs_score"):
        png = sweep.results / f"tiny_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text


def test_trainable_params_grow_with_rank_as_the_closed_form_says(sweep):
    from transformers import AutoConfig

    from harness.models.offline import resolve_offline_model

    config = AutoConfig.from_pretrained(resolve_offline_model("tiny-qwen2"))
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    # (in + out) of q, k, v, o, gate, up, down in one layer: LoRA adds r x (in + out) to each
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + (h + i) * 2 + (i + h)
    width, modules = per_layer * config.num_hidden_layers, 7 * config.num_hidden_layers
    trainable = {(r["recipe"], r["rank"]): r["result"]["trainable_params"] for r in sweep.records if r["result"]}
    assert trainable[("qwen2_7b_qlora", 4)] == 4 * width
    assert trainable[("qwen2_7b_qlora", 8)] == 8 * width
    # AdaLoRA trains P (r x in), Q (out x r) and the singular values E (r) at init_r = 3 x rank
    assert trainable[("qwen2_7b_adalora", 4)] == 12 * (width + modules)
    assert trainable[("qwen2_7b_adalora", 8)] == 24 * (width + modules)


def test_rerun_skips_trials_already_recorded(sweep, capsys):
    assert bench.main(sweep.argv) == 1  # the failing recipe runs (and fails) again
    out = capsys.readouterr().out
    assert out.count("already recorded ok, skipped") == 4
    records = read_records(sweep.results / RUNS_FILE)
    assert [r["recipe"] for r in records[6:]] == ["failing", "failing"]
    # Only the latest attempt of a trial counts: the table is the same as before.
    (sweep.results / "tiny.md").unlink()
    assert report.main(["--results-dir", str(sweep.results)]) == 0
    assert markdown_table(sweep.table.read_text(encoding="utf-8"), "## Trials that did not finish ok")[1][0] == "failing-r4-s42"


def test_report_rebuilds_identical_tables_and_survives_a_truncated_line(sweep, tmp_path, capsys):
    original = sweep.table.read_bytes()
    sweep.table.unlink()
    assert report.main(["--results-dir", str(sweep.results)]) == 0
    assert sweep.table.read_bytes() == original
    # The README's sample: the same trials' headline columns, every cell taken from the full table.
    capsys.readouterr()
    assert report.main(["--results-dir", str(sweep.results), "--sample", "tiny"]) == 0
    sample = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| qwen")]
    assert len(sample) == 4
    table = original.decode()
    for line in sample:
        cells = [c.strip() for c in line.strip("|").split("|")]
        full_row = next(r for r in table.splitlines() if r.startswith(f"| {cells[0]} ") and f" {cells[1]} " in r)
        assert all(f" {c} " in full_row for c in cells[2:]), (line, full_row)

    # A crash mid-append leaves half a line: it is skipped with a warning, the rest still reports.
    copy = tmp_path / "results"
    copy.mkdir()
    runs = copy / RUNS_FILE
    good = (sweep.results / RUNS_FILE).read_bytes()
    runs.write_bytes(good + b'{"sweep": "tiny", "trial_hash": "abc", "sta')
    capsys.readouterr()
    assert report.main(["--results-dir", str(copy)]) == 0
    assert "last line is not a complete record" in capsys.readouterr().err
    assert (copy / "tiny.md").read_bytes() == original
    # The next append starts on a fresh line, so both the old records and the new one stay readable.
    append_record(runs, {"sweep": "other", "trial_hash": "x"})
    kept = read_records(runs, warn=lambda m: None)
    assert [r["sweep"] for r in kept] == ["tiny"] * (len(kept) - 1) + ["other"]


def test_trial_past_its_time_limit_is_killed_and_recorded(tmp_path):
    sleeping = write_recipe(tmp_path, "sleeping", SLEEPING_RECIPE)
    argv = sweep_argv(tmp_path, "--recipes", sleeping, "--trial-timeout", "1.5", "--no-baseline")
    started = time.monotonic()
    assert bench.main(argv) == 1
    assert time.monotonic() - started < 60
    (record,) = read_records(tmp_path / "results" / RUNS_FILE)
    assert record["status"] == "timeout" and "1.5 s wall-clock limit" in record["reason"]
    assert 1.5 <= record["wall_seconds"] < 30
    assert record["rank_setting"] == {"r": 8}  # no --ranks: the recipe's own rank, shown


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killing_the_sweep_mid_trial_leaves_runs_jsonl_valid(sig, tmp_path, interruptible):
    results = tmp_path / "results"
    for n in range(3):  # records of earlier sweeps, which must survive untouched
        append_record(results / RUNS_FILE, {"sweep": "earlier", "trial_hash": str(n), "status": "ok"})
    before = (results / RUNS_FILE).read_bytes()
    sleeping = write_recipe(tmp_path, "sleeping", SLEEPING_RECIPE)
    argv = sweep_argv(tmp_path, "--recipes", sleeping, "--name", "killed", "--no-baseline")
    sweep_process = subprocess.Popen([sys.executable, "-m", "harness.bench", *argv], cwd=REPO_ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **interruptible)
    trials = tmp_path / "outputs" / "killed"
    # Wait until the trial itself is running (it says so), however loaded the machine is: a fixed sleep
    # here once timed out on a busy 2-core machine.
    deadline = time.monotonic() + 300
    logs = []
    while time.monotonic() < deadline:
        logs = list(trials.glob("*/trial.log"))
        if logs and "sleeping" in logs[0].read_text():
            break
        assert sweep_process.poll() is None, sweep_process.stderr.read()
        time.sleep(0.2)
    (trial_log,) = logs
    os.kill(sweep_process.pid, sig)
    _, err = sweep_process.communicate(timeout=300)  # writing the tables imports pandas and matplotlib

    after = (results / RUNS_FILE).read_bytes()
    assert after.startswith(before)
    records = read_records(results / RUNS_FILE, warn=pytest.fail)
    if sig == signal.SIGINT:
        assert sweep_process.returncode == 130 and b"rerun the same command to resume" in err, err.decode()[-2000:]
        assert len(records) == before.count(b"\n") + 1 and records[-1]["status"] == "interrupted"
    else:
        assert after == before
    import psutil

    time.sleep(0.5)  # the trial must not live on without its sweep
    orphans = [p for p in psutil.process_iter(["cmdline"]) if str(trial_log.parent) in " ".join(p.info["cmdline"] or [])]
    assert not orphans


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--ranks", "4,x"], "--ranks: 'x' is not a whole number"),
        (["--ranks", "0"], "--ranks: 0 is below 1"),
        (["--ranks", "-8"], "--ranks: -8 is below 1"),
        (["--ranks", "128", "--model", "tiny-qwen2"], "--ranks 128 is larger than tiny-qwen2's hidden size 64"),
        (["--recipes", "qwen2_7b_adalora,nope"], "unknown recipe 'nope'; known: "),
        (["--set", "lerning_rate=1e-4"], "no recipe has a setting named 'lerning_rate'"),
        (["--set", "seed=1,2"], "use --seeds"),
        (["--set", "learning_rate=fast"], "recipe qwen2_7b_adalora refuses the settings"),
        (["--seeds", "1.5"], "--seeds: '1.5' is not a whole number"),
        (["--results-dir", "{file}/results"], "results: {file} is a file, not a folder"),
        (["--results-dir", "{file}"], "--results-dir {file} is a file, not a folder"),
        (["--budget-steps", "0"], "--budget-steps must be at least 1"),
        (["--parallel", "0"], "--parallel must be at least 1"),
        (["--gpus", "0,1", "--parallel", "2"], "list it twice: --gpus 0,0"),
        (["--gpus", "0,x"], "'x' is neither a GPU number"),
        (["--ray-address", "head:6379"], "only apply with --executor ray"),
        (["--executor", "ray", "--gpus", "0"], "use --ray-resources"),
    ],
)
def test_bad_input_is_one_clear_line(argv, expected, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv, expected = [a.format(file=blocker) for a in argv], expected.format(file=blocker)
    if "--results-dir" not in argv:
        argv += ["--results-dir", str(tmp_path / "results")]
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--output-root", str(tmp_path / "out"), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench: ") and expected in err[0], err
    if "unknown recipe" in expected:
        assert "qwen2_7b_adalora" in err[0] and "qwen2_7b_qlora" in err[0]


def test_memory_budget_is_checked_against_peak_rss_on_cpu():
    outcome = {"exit_code": 0, "timed_out": False, "interrupted": False, "process_peak_rss_mb": 900.0,
               "log_tail": "", "result": {"status": "ok", "peak_memory_kind": "cpu_rss", "peak_memory_mb": 850.0}}
    assert bench.classify(outcome, memory_budget_gb=1.0, timeout_s=60) == ("ok", None)
    status, reason = bench.classify(outcome, memory_budget_gb=0.5, timeout_s=60)
    assert status == "over-budget" and "900 MiB" in reason and "not enforced" in reason
    # On CUDA the allocator cap turns "needs more" into an OOM: over budget, not a plain OOM.
    capped = {**outcome, "exit_code": 3, "result": {"status": "oom", "memory_budget_enforced": "cuda_allocator"}}
    assert bench.classify(capped, memory_budget_gb=16, timeout_s=60)[0] == "over-budget"
    assert bench.classify({**capped, "result": {"status": "oom"}}, memory_budget_gb=None, timeout_s=60)[0] == "oom"


def test_mfu_uses_the_gpu_peak_and_stays_blank_when_unknown():
    from harness.reporting.flops import gpu_peak_tflops, mfu_percent

    assert gpu_peak_tflops("cuda:0 NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_peak_tflops("cuda:0 NVIDIA H100 PCIe") == 756.0
    assert gpu_peak_tflops("cuda:0 NVIDIA L40S") == 362.1 and gpu_peak_tflops("cuda:0 NVIDIA L4") == 121.0
    assert gpu_peak_tflops("cuda:0 Tesla T4") == 65.0
    assert gpu_peak_tflops("cuda:0 NVIDIA GeForce RTX 3090 Ti") is None
    assert gpu_peak_tflops("cpu Intel Xeon (2 cores)") is None
    lora = {"device": "cuda:0 NVIDIA H100 80GB HBM3", "method": "lora", "tokens_per_second": 1000.0,
            "total_params": 7_600_000_000, "config": {"activation_checkpointing": True}}
    assert mfu_percent(lora) == pytest.approx(100 * 1000 * 6 * 7.6e9 / 989.4e12)
    assert mfu_percent({**lora, "config": {}}) == pytest.approx(100 * 1000 * 4 * 7.6e9 / 989.4e12)
    assert mfu_percent({**lora, "method": "full", "config": {}}) == pytest.approx(100 * 1000 * 6 * 7.6e9 / 989.4e12)
    assert mfu_percent({**lora, "device": "cuda:0 Mystery GPU"}) is None


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="the memory cap is a CUDA allocator feature; no GPU here")
def test_memory_budget_caps_cuda_allocations(tmp_path):
    argv = sweep_argv(tmp_path, "--recipes", "qwen2_7b_qlora", "--budget-steps", "2", "--memory-budget-gb", "0.001", "--no-baseline")
    assert bench.main(argv) == 1
    (record,) = read_records(tmp_path / "results" / RUNS_FILE)
    assert record["status"] == "over-budget", record["reason"]
    assert record["result"]["memory_budget_enforced"] == "cuda_allocator"


def test_trials_of_other_settings_are_never_averaged_as_seeds(tmp_path):
    """A sweep rerun with another budget into the same results folder: its trials get their own rows,
    named by the setting that differs, instead of being averaged with the first sweep's as seeds."""
    def record(steps: int, seed: int, loss: float) -> dict:
        config = {"max_steps": steps, "seed": seed, "r": 8, "learning_rate": 1e-4, "output_dir": f"o/{steps}-{seed}"}
        return {"sweep": "s", "trial_hash": f"{steps}-{seed}", "trial_id": f"t{steps}-{seed}", "status": "ok",
                "recipe": "qwen2_7b_qlora", "method": "lora", "rank": 8, "rank_setting": {"r": 8}, "seed": seed,
                "axes": {}, "bench_command": "python -m harness.bench", "budgets": {"trial_timeout_s": 600},
                "result": {"config": config, "eval_loss": loss, "global_step": steps, "device": "cpu"}}

    results = tmp_path / "results"
    for rec in (record(2, 1, 1.0), record(2, 2, 3.0), record(3, 1, 5.0)):
        append_record(results / RUNS_FILE, rec)
    report.write_report(results, "s")
    head, *body = markdown_table((results / "s.md").read_text(), "## Comparison")
    rows = {row[head.index("settings")]: row for row in body}
    assert set(rows) == {"max_steps=2", "max_steps=3"}
    assert rows["max_steps=2"][head.index("eval loss")] == "2.0000 ± 1.4142"  # seeds 1 and 2 of one experiment
    assert rows["max_steps=2"][head.index("seeds")] == "1,2"
    assert rows["max_steps=3"][head.index("eval loss")] == "5.0000"


def test_a_baseline_is_planned_once_per_quantization_and_eval_set_and_runs_first(tmp_path, capsys):
    argv = sweep_argv(tmp_path, "--recipes", "qwen2_7b_adalora,qwen2_7b_qlora,qwen2_5_0_5b_lora,qwen2_5_0_5b_qlora",
                      "--ranks", "4,8", "--seeds", "1,2", "--set", "task=classification",
                      "--set", "data_file=data/imdb_samples_2000.csv", "--dry-run")
    assert bench.main(argv) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    ids = [line.split(":")[0].split("] ")[1] for line in lines]
    # The two 7B recipes score on the same prompts, model and 4-bit base: one baseline for both. The
    # Qwen2.5 recipes lay prompts out with the chat template (another eval set): one for their 16-bit
    # base, one for their 4-bit base. Each comes just before the first trial that needs it.
    assert len(ids) == 3 + 4 * 2 * 2
    baseline_at = [i for i, trial in enumerate(ids) if trial.startswith("baseline-")]
    assert baseline_at == [0, 9, 14]
    assert [ids[i + 1] for i in baseline_at] == [
        "qwen2_7b_adalora-r4-s1", "qwen2_5_0_5b_lora-r4-s1", "qwen2_5_0_5b_qlora-r4-s1"]
    assert [ids[i].split("-")[1] for i in baseline_at] == ["4bit", "16bit", "4bit"]
    baselines = [lines[i] for i in baseline_at]
    assert all("--method none" in line and "--r " not in line and "--target_r" not in line for line in baselines)
    assert sum("--method none" in line for line in lines) == 3
    assert bench.main([*argv, "--no-baseline"]) == 0
    assert len([line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]) == 16


def test_baseline_heads_the_table_and_gains_are_judged_against_noise(tmp_path):
    def record(trial: str, method: str, accuracy: float, se: float, seed: int = 1, rank: int | None = 8) -> dict:
        config = {"max_steps": 12, "seed": seed, "method": method, "output_dir": f"o/{trial}"}
        return {"sweep": "s", "trial_hash": trial, "trial_id": trial, "status": "ok", "recipe": "r_" + method,
                "method": method, "rank": rank, "rank_setting": {"r": rank} if rank else {}, "seed": seed,
                "axes": {}, "scored_on": "same-eval-set", "bench_command": "python -m harness.bench",
                "budgets": {"trial_timeout_s": 600},
                "result": {"config": config, "quantization": "none", "device": "cpu", "global_step": 12,
                           "trainable_params": 0 if method == "none" else 1000, "train_seconds": 1.0,
                           "eval": {"accuracy": accuracy, "accuracy_se": se},
                           "forgetting": {"delta": 0.0 if method == "none" else 0.25}}}

    results = tmp_path / "results"
    for rec in (record("lora", "lora", 0.80, 0.028), record("ia3", "ia3", 0.72, 0.032, rank=None),
                record("base", "none", 0.70, 0.032, rank=None)):
        append_record(results / RUNS_FILE, rec)
    report.write_report(results, "s")
    head, *body = markdown_table((results / "s.md").read_text(), "## Comparison")
    assert body[0][head.index("recipe")] == "baseline: untrained (16-bit)"  # first, though recorded last
    rows = {row[head.index("method")]: row for row in body}
    assert rows["lora"][head.index(tables.GAIN)] == "+0.100" and rows["lora"][head.index(tables.NOISE)] == "yes"
    # 0.02 on 200 examples is well inside the noise (1.96 x sqrt(0.032^2 + 0.032^2) = 0.089)
    assert rows["ia3"][head.index(tables.GAIN)] == "+0.020" and rows["ia3"][head.index(tables.NOISE)] == "within noise"
    assert rows["none"][head.index(tables.GAIN)] == ""
    assert rows["lora"][head.index("forgetting (Δ loss)")] == "+0.2500"
    # the baseline trains nothing: no training time or forgetting measured, so blank cells rather than 0
    assert rows["none"][head.index("forgetting (Δ loss)")] == "" and rows["none"][head.index("train (s)")] == ""
    assert rows["lora"][head.index("train (s)")] == "1.00"
    assert rows["lora"][head.index("eval accuracy SE")] == "0.028"
    for name in ("params_vs_score", "train_time_vs_score", "memory_vs_score", "rank_vs_score"):
        assert (results / f"s_{name}.png").is_file()


def test_records_the_tools_write_under_results_do_not_mark_a_trial_as_uncommitted_code(tmp_path, monkeypatch):
    """A sweep appends to results/runs.jsonl after each trial; the next trial's provenance must still
    say it ran the committed code, and a changed source file must still say it did not."""
    import subprocess

    from harness.run import measure

    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    (repo / "harness").mkdir()
    (repo / "results" / "runs.jsonl").write_text("{}\n")
    (repo / "harness" / "code.py").write_text("x = 1\n")

    def git(*args):
        subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                       check=True, capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "start")
    monkeypatch.setattr(measure, "REPO_ROOT", repo)
    assert measure.git_state()["dirty"] is False
    (repo / "results" / "runs.jsonl").write_text("{}\n{}\n")  # the sweep's own record of a finished trial
    assert measure.git_state()["dirty"] is False
    (repo / "harness" / "code.py").write_text("x = 2\n")
    assert measure.git_state()["dirty"] is True


def test_packing_timing_table_compares_each_way_with_the_fixed_length_baseline():
    from harness.bench import packing_timing as pt

    def run(speed, positions, loss=1.0):
        return {"tokens_per_second": speed, "train_seconds": 1000 / speed, "tokens_trained": 1000,
                "positions_trained": positions, "peak_memory_mb": 900.0, "train_loss": loss, "eval_loss": 2.0}

    ways = list(pt.ways(512))
    data = {"command": "python -m harness.bench.packing_timing -- recipes/x.py", "run": "python recipes/x.py",
            "window": 512, "device": "cpu test", "model": "tiny-qwen2", "git": {"commit": "abc"}, "versions": {},
            "data": {"data_file": "data/x.csv", "train_examples": 8},
            "runs": {ways[0]: [run(100, 2048), run(110, 2048), run(90, 2048)],
                     ways[1]: [run(130, 1500), run(135, 1500), run(120, 1500)],
                     ways[2]: [run(160, 1000), run(170, 1000), run(150, 1000)],
                     ways[3]: [run(200, 1000, 0.9), run(210, 1000, 0.9), run(95, 1000, 0.9)]}}
    rows = {line.split(" | ")[0].lstrip("| "): line for line in pt.render(data).splitlines() if line.startswith("| ")}
    assert "(baseline)" in rows[ways[0]] and "2.05" in rows[ways[0]]  # positions per real token: the padding
    assert "1.60x | yes: the ranges do not overlap | 1.00 | 2.05x" in rows[ways[2]]  # median 160 / 100; ideal
    assert "2.00x | no: the ranges overlap" in rows[ways[3]]  # 95 falls inside the baseline's 90-110
    assert "0.9000" in rows[ways[3]]


def test_overhead_timing_table_gives_recipe_over_plain_and_refuses_a_different_training(monkeypatch, tmp_path):
    from harness.bench import overhead_timing as ot

    def run(wall, runtime, tokens=512, steps=2):
        return {"wall_seconds": wall, "train_runtime": runtime, "tokens": tokens, "global_step": steps, "train_loss": 4.0576}

    data = {"command": "python -m harness.bench.overhead_timing", "ways": {w: f"python {w}" for w in ot.WAYS},
            "device": "cpu test", "model": "tiny-qwen2", "git": {"commit": "abc"}, "versions": {},
            "runs": {ot.WAYS[0]: [run(100, 80), run(104, 82), run(98, 79)],
                     ot.WAYS[1]: [run(110, 81), run(112, 80), run(109, 83)]}}
    rows = [line for line in ot.render(data).splitlines() if line.startswith("| wall") or line.startswith("| train_runtime")]
    assert rows == ["| wall | 1.100 | yes: the ranges do not overlap |",  # 110 / 100 (medians); 109 > 104
                    "| train_runtime | 1.012 | no: the ranges overlap |"]  # 81 / 80

    # Different tokens or steps mean the two ways did not train the same thing: refused, nothing written.
    figures = iter([run(100, 80), run(100, 80, tokens=500)])
    monkeypatch.setattr(ot, "run_once", lambda way, command, folder: next(figures))
    monkeypatch.setattr("harness.models.offline.resolve_offline_model", lambda name: "/models/x")
    out = tmp_path / "overhead.md"
    with pytest.raises(SystemExit) as stopped:
        ot.main(["--repeats", "1", "--out", str(out)])
    assert stopped.value.code == 2 and not out.exists()
