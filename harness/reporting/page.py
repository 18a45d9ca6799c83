"""python -m harness.report: rebuild the benchmark tables and plots from results/runs.jsonl.

  python -m harness.report                       # every sweep recorded in results/runs.jsonl
  python -m harness.report --sweep stories260k   # one sweep
  python -m harness.report --calibrations DIR    # the devices' calibrations for "predicted train" (results/gpu)

For each sweep, results/<sweep>.md holds: the exact commands and the machine, the settings every
trial shared, one comparison table (a row per recipe x rank x --set values, mean +- std over the
seeds; beside the measured train time, the time planner's prediction where the trials' device has a
calibration), a rank pivot per headline metric, the plots, and the trials that did not finish ok with
their reason. Plots go next to it as results/<sweep>_*.png. Everything comes from the records
and the calibration files (nothing from "now"), so rebuilding from the same runs.jsonl and results/gpu/ gives the
same tables byte for byte.
When a trial was run several times (--force, or a failure then a success), its latest record counts.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from harness.errors import OneLineArgumentParser, UserError, first_line, reported_as_one_line
from harness.files import write_text_atomic
from harness.locations import RESULTS_DIR
from harness.models.offline import OFFLINE_MODELS
from harness.plan.time_check import predict
from harness.reporting.plots import write_plots
from harness.reporting.runs import RUNS_FILE, read_records, trial_record_problem
from harness.reporting.tables import (
    BASELINE,
    PIVOT_METRICS,
    PLANNED,
    PLANNED_RATIO,
    PREDICTED_TRAIN,
    RANK_HEADER,
    SHARED_SETTINGS,
    comparison_table,
    failures_table,
    how_it_ran,
    latest_per_trial,
    ok_rows,
    pivot_table,
    recipe_label,
    score_column,
    trial_records,
)

# ---------------------------------------------------------------------------- header

def _distinct(values) -> list[str]:
    return sorted({v for v in values if v not in (None, "")})


def model_note(model: str) -> str:
    description = OFFLINE_MODELS.get(model, "")
    if description.startswith("Random-weight"):
        return f"`{model}` (**random weights**: losses and scores only show that the pipeline runs)"
    if model in OFFLINE_MODELS:
        return f"`{model}` (real pretrained weights, offline: {description})"
    return f"`{model}`"


def header(sweep: str, records: list[dict[str, Any]]) -> list[str]:
    results = [r["result"] for r in records if r.get("result")]
    ok = sum(r["status"] == "ok" for r in records)
    started = min((r["started_at"] for r in records if r.get("started_at")), default="?")
    finished = max((r["finished_at"] for r in records if r.get("finished_at")), default="?")
    lines = [
        f"# Benchmark sweep `{sweep}`",
        "",
        f"{ok} of {len(records)} trials ok; run between {started} and {finished} (UTC). "
        "Rebuild this file with `python -m harness.report`.",
        "",
        "Made with (from the repository root):",
        "",
        "```",
        *dict.fromkeys(r["bench_command"] for r in records if r.get("bench_command")),
        "```",
        "",
    ]
    devices = _distinct(r.get("device") for r in results)
    kinds = _distinct(r.get("peak_memory_kind") for r in results)
    device_line = f"- **Device**: {'; '.join(devices) or 'unknown (no trial got far enough to record it)'}"
    if "cpu_rss" in kinds:
        device_line += (
            ". **CPU run**: memory is the trial process's peak resident set size (`cpu_rss`), not GPU memory; "
            "MFU does not apply"
        )
    lines.append(device_line + ".")
    models = _distinct(r.get("model") for r in records)
    lines.append(f"- **Model**: {', '.join(model_note(m) for m in models)}.")
    commits = _distinct(
        f"{(r.get('git') or {}).get('commit') or 'unknown'}"
        + (" (with uncommitted changes)" if (r.get("git") or {}).get("dirty") else "")
        for r in results
    )
    lines.append(f"- **Commit**: {'; '.join(commits) or 'unknown'}.")
    versions = _distinct(", ".join(f"{k} {v}" for k, v in (r.get("versions") or {}).items()) for r in results)
    lines.append(f"- **Versions**: {'; '.join(versions) or 'unknown'}.")
    shared = []
    configs = [r.get("config") or {} for r in results]
    for key in SHARED_SETTINGS:
        if key == "num_train_epochs" and all((c.get("max_steps") or -1) > 0 for c in configs):
            continue  # a step budget overrides the epochs: showing them would mislead
        values = list(dict.fromkeys(json.dumps(c.get(key)) for c in configs if key in c))
        if not values or values == ["null"]:
            continue
        shared.append(f"{key} {values[0]}" if len(values) == 1 else f"{key} **differs**: {' / '.join(values)}")
    if shared:
        lines.append(f"- **Settings every trial shared** (budgets first): {'; '.join(shared)}.")
    threads = _distinct(str(r["cpu_threads"]) for r in records if r.get("cpu_threads"))
    if threads:
        lines.append(f"- **CPU threads per trial** (OMP_NUM_THREADS): {', '.join(threads)}.")
    ways = _distinct(how_it_ran(r) for r in records)
    if ways != ["one trial at a time"]:
        lines.append(f"- **How trials ran**: {'; '.join(ways)}.")
    timeouts = _distinct(str((r.get("budgets") or {}).get("trial_timeout_s")) for r in records)
    lines.append(f"- **Per-trial wall-clock limit**: {', '.join(timeouts)} s (a trial past it is recorded as timeout).")
    memory_budgets = _distinct(str((r.get("budgets") or {}).get("memory_gb")) for r in records
                               if (r.get("budgets") or {}).get("memory_gb"))
    if memory_budgets:
        enforced = _distinct(r.get("memory_budget_enforced") for r in results)
        how = (
            "enforced by the CUDA allocator's per-process memory fraction"
            if enforced == ["cuda_allocator"]
            else "not enforced on CPU: checked after each run against the trial's peak RSS"
        )
        lines.append(f"- **Memory budget**: {', '.join(memory_budgets)} GiB per trial, {how}.")
    lines += [
        "- **Rank mapping**: LoRA / DoRA / rsLoRA / LoftQ: r = rank; AdaLoRA: target_r = rank, init_r = 3 x rank "
        "(the flagship's 12 -> 4); lora_alpha stays at the recipe's value; methods without a rank run once per seed.",
        "",
    ]
    return lines


COLUMN_NOTES = (
    "Columns: *peak memory* is the recipe's own measurement of the kind named in *memory kind* "
    "(`cuda_reserved`: PyTorch's peak reserved memory above the baseline after CUDA init; `cpu_rss`: the trial "
    "process's peak RSS); *NVML peak* is the driver's figure (the CUDA context and memory PyTorch does not allocate "
    "included) for the trial's own process (*NVML of* `process`) or, where NVML could not tell the process apart, "
    "for the whole GPU (`device`: other processes on it included); *planned peak* is what the recipe's memory "
    "plan (harness.plan) predicted before loading, "
    "without the CUDA context (for a CPU run, for its fp32 compute), and *measured / planned* checks it against "
    "GPU memory only; *trial process peak RSS* is the same process measured from outside (`wait4`), from "
    "start to exit; *train* is optimizer steps only (no evaluation, no saving), *predicted train* the time "
    "planner's prediction of it (see the note above), *total* the recipe's whole run "
    "(load, train, evaluate, save), *trial wall* the process from start to exit (imports included); "
    "*tokens/s* counts non-padding tokens trained on; *MFU* uses 4N FLOPs per token for adapters (6N with "
    "activation checkpointing; full fine-tuning 6N / 8N) against the GPU's dense 16-bit peak; *adapter* is the "
    "saved adapter file (*saved model* after full fine-tuning); scores are on the held-out split. A ± is the sample standard deviation over seeds. "
    "*Baseline* rows are the untrained model (method none) scored on the same held-out split with the same prompts "
    "(one per quantization of the base); *eval accuracy SE* is the binomial standard error of an accuracy on that "
    "many held-out examples; *Δ accuracy vs baseline* is a trial's accuracy minus its baseline's, *beyond noise?* "
    "says whether it exceeds 1.96 x the two accuracies' combined SE; *forgetting* is the change of the mean "
    "per-token loss on general text the trial never trained on (Alpaca responses), after minus before training: "
    "> 0 means the model got worse at it."
)


# ---------------------------------------------------------------------------- the report

def predicted_train(rows: list[dict[str, Any]], ok_trials: list[dict[str, Any]],
                    calibrations: Path | None = None) -> list[str]:
    """Fill each trained row's PREDICTED_TRAIN with the time planner's prediction of its train time
    (harness.plan.time_check.predict, from the calibration of the trial's device in `calibrations`, default
    results/gpu/; never a data sheet: a table of measurements gets a prediction only from a measured speed), and
    return the note that goes below the table: where the speeds came from and why any trial has none.
    ok_trials are the records of `rows`, in order (tables.ok_rows keeps one row per ok record)."""
    if len(rows) != len(ok_trials):
        raise ValueError(f"{len(rows)} rows for {len(ok_trials)} records")
    sources: dict[str, None] = {}
    missing: dict[str, list[str]] = {}
    done: dict[str, dict[str, Any]] = {}  # trials of one experiment, device and steps share one prediction
    for row, record in zip(rows, ok_trials):
        if row["method"] == BASELINE:
            continue  # trains nothing: nothing to predict
        result = record.get("result") or {}
        key = json.dumps([row["_experiment"], result.get("device"), result.get("global_step")], default=str)
        if key not in done:
            try:
                done[key] = predict(record, folder=calibrations, calibrated_only=True)
            except Exception as exc:  # a prediction the planner cannot make must not cost the sweep its table
                done[key] = {"reason": f"the time planner failed on it ({type(exc).__name__}: {first_line(exc)})"}
        found = done[key]
        if "predicted" in found:
            row[PREDICTED_TRAIN] = found["predicted"]
            sources[found["estimate"].speed.source] = None
        else:
            missing.setdefault(found["reason"], []).append(record.get("trial_id") or "?")
    notes = []
    if sources:
        notes.append(f"*{PREDICTED_TRAIN}*: the time planner's prediction of *train (s)* from the trial's own "
                     "settings (harness/plan/work.py counts a step's work, harness/plan/timing.py its seconds), "
                     f"times its steps; speed from {'; '.join(sources)} (in {calibrations or 'results/gpu'}). "
                     "`python -m harness.plan.time_check` compares the two trial by trial.")
    for reason, trials in missing.items():
        shown = ", ".join(trials[:3]) + (f" and {len(trials) - 3} more" if len(trials) > 3 else "")
        where = "left empty" if sources else "not shown"  # a column nobody predicted is dropped, as any other
        notes.append(f"*{PREDICTED_TRAIN}* {where} for {shown}: {reason.rstrip('.')}.")
    return [line for note in notes for line in (note, "")]


def render(sweep: str, records: list[dict[str, Any]], plots: list[Path], calibrations: Path | None = None) -> str:
    trials = latest_per_trial(records)
    rows = ok_rows(trials)
    notes = predicted_train(rows, [t for t in trials if t["status"] == "ok"], calibrations)
    rows.sort(key=lambda row: (row["method"] != BASELINE, _first_seen(trials, row["recipe"]), row["settings"],
                               row["_rank"], row["seed"]))
    lines = header(sweep, trials)
    lines += ["## Comparison", ""]
    if rows:
        lines += [comparison_table(rows).to_markdown(index=False, disable_numparse=True), "", *notes, COLUMN_NOTES,
                  ""]
        pivots = [m for m in (*PIVOT_METRICS, score_column(rows)) if m]
        lines += ["## By rank", ""]
        for metric in dict.fromkeys(pivots):
            table = pivot_table(rows, metric)
            if table is not None:
                lines += [f"### {metric}", "", table.to_markdown(index=False, disable_numparse=True), ""]
    else:
        lines += ["No trial finished ok yet.", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in plots]
        lines.append("")
    failed = [r for r in trials if r["status"] != "ok"]
    lines += ["## Trials that did not finish ok", ""]
    if failed:
        lines += [failures_table(failed).to_markdown(index=False, disable_numparse=True), ""]
    else:
        lines += ["None.", ""]
    return "\n".join(lines)


def _first_seen(trials: list[dict[str, Any]], label: str) -> int:
    return next((i for i, r in enumerate(trials) if recipe_label(r) == label), len(trials))


def write_report(results_dir: Path, sweep: str, records: list[dict[str, Any]] | None = None,
                 calibrations: Path | None = None) -> list[Path]:
    """Write <results_dir>/<sweep>.md and its plots; returns the files written. calibrations: the folder of the
    devices' calibration files for the predicted train time (default results/gpu/)."""
    results_dir = Path(results_dir)
    if records is None:
        records = read_records(results_dir / RUNS_FILE, check=trial_record_problem)
    records = [r for r in trial_records(records) if r.get("sweep") == sweep]
    if not records:
        return []

    trials = latest_per_trial(records)
    rows = ok_rows(trials)
    plots = write_plots(rows, results_dir, sweep, score_column(rows)) if rows else []
    path = results_dir / f"{sweep}.md"
    write_text_atomic(path, render(sweep, records, plots, calibrations))
    return [path, *plots]


SAMPLE_COLUMNS = ("recipe", RANK_HEADER, "peak memory (MiB)", PLANNED, PLANNED_RATIO, "train (s)", "tokens/s", "trainable params",
                  "adapter (MiB)", "eval loss")


def sample_table(records: list[dict[str, Any]], sweep: str) -> str:
    """The headline columns of a sweep's comparison table, e.g. for docs/benchmarks.md."""
    rows = ok_rows(latest_per_trial([r for r in trial_records(records) if r.get("sweep") == sweep]))
    if not rows:
        raise UserError(f"sweep {sweep} has no ok trial to show")
    table = comparison_table(rows)
    return table.loc[:, [c for c in SAMPLE_COLUMNS if c in table.columns]].to_markdown(index=False, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineArgumentParser(
        prog="python -m harness.report",
        description="Rebuild the benchmark tables (<results-dir>/<sweep>.md) and plots from <results-dir>/runs.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="Folder holding runs.jsonl.")
    parser.add_argument("--sweep", action="append", default=None, help="Only this sweep (repeatable). Unset: all.")
    parser.add_argument("--sample", metavar="SWEEP", help="Print the headline columns of this sweep's table instead "
                        "(docs/benchmarks.md's sample) and write nothing.")
    parser.add_argument("--calibrations", metavar="DIR", default=None, help="Folder of the devices' calibration "
                        "files (python -m harness.plan.calibrate) for the predicted train time; default results/gpu.")
    with reported_as_one_line("report"):
        args = parser.parse_args(argv)
        results_dir = Path(args.results_dir).expanduser()
        runs = results_dir / RUNS_FILE
        if not runs.is_file():
            raise UserError(f"no {RUNS_FILE} in {results_dir}; run python -m harness.bench first or pass --results-dir")
        calibrations = Path(args.calibrations).expanduser() if args.calibrations else None
        if calibrations is not None and not calibrations.is_dir():
            raise UserError(f"--calibrations {calibrations}: no such folder; give the folder that holds the "
                            "calibration-<device>.json files (results/gpu)")
        damaged: list[str] = []
        records = read_records(runs, warn=damaged.append, check=trial_record_problem)
        if not records:
            what = f"all {len(damaged)} of its lines are damaged" if damaged else "it is empty"
            raise UserError(
                f"{runs} holds no complete record ({what}); run python -m harness.bench to fill it, "
                "or pass the --results-dir of a sweep"
            )
        records = trial_records(records, warn=damaged.append)
        if not records:
            raise UserError(f"{runs} holds no harness.bench trial record; run python -m harness.bench to fill it")
        known = list(dict.fromkeys(r.get("sweep") for r in records if r.get("sweep")))
        for sweep in (args.sweep or []) + ([args.sample] if args.sample else []):
            if sweep not in known:
                raise UserError(f"sweep {sweep!r} is not in {runs}; recorded sweeps: {', '.join(known) or 'none'}")
        for message in damaged:  # after every refusal: a refusal stays one line
            print(f"warning: {message}", file=sys.stderr)
        if args.sample:
            print(sample_table(records, args.sample))
            return 0
        for sweep in args.sweep or known:
            try:
                written = write_report(results_dir, sweep, records, calibrations)
            except OSError as exc:
                raise UserError(f"cannot write the tables to {results_dir} ({exc.strerror}); "
                                "pass a --results-dir you can write to") from None
            for path in written:
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
