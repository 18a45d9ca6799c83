"""python -m harness.report: rebuild the benchmark tables and plots from results/runs.jsonl.

  python -m harness.report                       # every sweep recorded in results/runs.jsonl
  python -m harness.report --sweep stories260k   # one sweep

For each sweep, results/<sweep>.md holds: the exact commands and the machine, the settings every
trial shared, one comparison table (a row per recipe x rank x --set values, mean +- std over the
seeds), a rank pivot per headline metric, the plots, and the trials that did not finish ok with
their reason. Plots go next to it as results/<sweep>_*.png. Everything comes from the records
(nothing from "now"), so rebuilding from the same runs.jsonl gives the same tables byte for byte.
When a trial was run several times (--force, or a failure then a success), its latest record counts.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from harness import REPO_ROOT  # not harness.config: this tool needs no transformers
from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.records import LOCATION_SETTINGS, RUNS_FILE, read_records

MIB = 1024 * 1024
GAIN = "Δ accuracy vs baseline"
NOISE = "beyond noise?"
RANK_HEADER = "rank (r / target_r ← init_r)"
NO_RANK = "no rank"
PLANNED = "planned peak (MiB)"
PLANNED_RATIO = "measured / planned"

# Comparison-table columns after the identifying ones, with their number format.
METRIC_FORMATS: dict[str, str] = {
    "peak memory (MiB)": "{:.1f}",
    PLANNED: "{:.1f}",
    PLANNED_RATIO: "{:.2f}",
    "CUDA reserved (MiB)": "{:.1f}",
    "CUDA allocated (MiB)": "{:.1f}",
    "NVML device peak (MiB)": "{:.1f}",
    "trial process peak RSS (MiB)": "{:.1f}",
    "train (s)": "{:.2f}",
    "total (s)": "{:.2f}",
    "trial wall (s)": "{:.1f}",
    "tokens/s": "{:.1f}",
    "MFU (%)": "{:.2f}",
    "trainable params": "{:,.0f}",
    "trainable (%)": "{:.4f}",
    "adapter (MiB)": "{:.3f}",
    "saved model (MiB)": "{:.1f}",
    "train loss": "{:.4f}",
    "eval loss": "{:.4f}",
    "forgetting (Δ loss)": "{:+.4f}",
    GAIN: "{:+.3f}",
    "steps": "{:.0f}",
}
EVAL_FORMAT = "{:.3f}"
PIVOT_METRICS = ("peak memory (MiB)", "train (s)", "tokens/s", "trainable params", "adapter (MiB)", "eval loss")
SCORE_PREFERENCE = ("eval accuracy", "eval macro F1", "eval answer-token accuracy")

# Settings that make trials comparable; the header shows their values (and flags any that differ).
SHARED_SETTINGS = (
    "max_steps", "budget_seconds", "budget_tokens", "memory_budget_gb", "num_train_epochs", "data_file",
    "max_samples", "validation_split", "split_seed", "max_seq_length", "eval_max_samples", "data_seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "optim",
    "quantization", "target_modules", "activation_checkpointing",
)


# ---------------------------------------------------------------------------- records -> rows

TRIAL_FIELDS = ("sweep", "trial_hash", "trial_id", "status", "recipe", "method", "seed")


def trial_records(records: list[dict[str, Any]], warn=None) -> list[dict[str, Any]]:
    """The records harness.bench wrote; anything else in runs.jsonl (a line of another shape, added by
    hand or by another tool) is skipped, with one warning for all of them."""
    kept = [r for r in records if all(k in r for k in TRIAL_FIELDS)]
    if warn and len(kept) < len(records):
        warn(f"skipped {len(records) - len(kept)} record(s) that are not harness.bench trials "
             f"(a trial record has {', '.join(TRIAL_FIELDS)})")
    return kept


def latest_per_trial(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        latest.pop(record["trial_hash"], None)  # re-insert: order of the latest attempts
        latest[record["trial_hash"]] = record
    return list(latest.values())


def rank_label(record: dict[str, Any]) -> str:
    setting = record.get("rank_setting") or {}
    if "target_r" in setting:
        return f"target_r {setting['target_r']} ← init_r {setting['init_r']}"
    if "r" in setting:
        return f"r {setting['r']}"
    return NO_RANK


def axes_label(record: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in (record.get("axes") or {}).items())


def eval_name(key: str) -> str:
    return "eval " + {"macro_f1": "macro F1", "answer_token_accuracy": "answer-token accuracy",
                      "accuracy_se": "accuracy SE"}.get(key, key.replace("_", " "))


BASELINE = "none"  # harness.bench's baseline trials: the untrained model, scored like every trial


def planned_memory(result: dict[str, Any]) -> dict[str, Any]:
    """The recipe's memory plan beside its measurement. The CUDA context is left out of the plan, as the
    measurement (reserved above the baseline after CUDA init) leaves it out; the ratio checks the planner
    only against GPU memory (a CPU run's peak RSS also holds Python, the libraries and the data)."""
    plan = result.get("memory_plan") or {}
    if plan.get("planned_peak_mb") is None:
        return {PLANNED: None, PLANNED_RATIO: None}
    planned = plan["planned_peak_mb"] - (plan.get("cuda_context_mb") or 0)
    measured = result.get("peak_memory_mb") if result.get("peak_memory_kind") == "cuda_reserved" else None
    return {PLANNED: planned, PLANNED_RATIO: measured / planned if measured and planned else None}


def recipe_label(record: dict[str, Any]) -> str:
    if record.get("method") != BASELINE:
        return record["recipe"]
    quantization = ((record.get("result") or {}).get("quantization")) or "none"
    return f"baseline: untrained ({'16-bit' if quantization == 'none' else quantization})"


def trial_row(record: dict[str, Any]) -> dict[str, Any]:
    from harness.flops import mfu_percent

    result = record.get("result") or {}
    adapter, model_bytes = result.get("adapter_bytes"), result.get("model_bytes")
    forgetting = result.get("forgetting") or {}
    trained = record["method"] != BASELINE  # a baseline's training time and forgetting are not measured: blank, not 0
    row = {
        "recipe": recipe_label(record),
        "method": record["method"],
        RANK_HEADER: rank_label(record),
        "settings": axes_label(record),
        "seed": record["seed"],
        "device": device_label(record),
        "_rank": record.get("rank") if record.get("rank") is not None else math.inf,
        "peak memory (MiB)": result.get("peak_memory_mb"),
        "memory kind": result.get("peak_memory_kind"),
        **planned_memory(result),
        "CUDA reserved (MiB)": result.get("cuda_reserved_mb"),
        "CUDA allocated (MiB)": result.get("cuda_allocated_mb"),
        "NVML device peak (MiB)": result.get("nvml_used_mb"),
        "trial process peak RSS (MiB)": record.get("process_peak_rss_mb"),
        "train (s)": result.get("train_seconds") if trained else None,
        "total (s)": result.get("total_seconds"),
        "trial wall (s)": record.get("wall_seconds"),
        "tokens/s": result.get("tokens_per_second"),
        "MFU (%)": mfu_percent(result) if result else None,
        "trainable params": result.get("trainable_params"),
        "trainable (%)": result.get("trainable_percent"),
        "adapter (MiB)": adapter / MIB if adapter is not None else None,
        "saved model (MiB)": model_bytes / MIB if model_bytes is not None else None,  # full fine-tuning
        "train loss": result.get("train_loss"),
        "eval loss": result.get("eval_loss"),
        "forgetting (Δ loss)": forgetting.get("delta") if trained else None,
        "_scored_on": record.get("scored_on"),
    }
    for key, value in (result.get("eval") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "examples":
            row[eval_name(key)] = value
    row["steps"] = result.get("global_step")
    row["stopped by"] = result.get("stopped_by")
    return row


def device_label(record: dict[str, Any]) -> str | None:
    """The device a trial ran on, as the recipe saw it, named as the sweep placed it: a trial given one GPU
    (--gpus, Ray) sees it as cuda:0, so the GPU's own number is shown; a Ray trial also names its host."""
    device = (record.get("result") or {}).get("device")
    ran = record.get("ran_on") or {}
    if device and ran.get("gpu") is not None:
        device = f"GPU {ran['gpu']}: {device.split(' ', 1)[-1]}"
    if device and ran.get("executor") == "ray" and ran.get("host"):
        device = f"{ran['host']}: {device}"
    return device


def how_it_ran(record: dict[str, Any]) -> str:
    ran = record.get("ran_on") or {}
    slots = ran.get("slots") or 1
    if ran.get("executor") == "ray":
        return f"as Ray tasks (`--executor ray`), up to {slots} at a time"
    if ran.get("gpu") is not None:
        return f"{slots} at a time, one per GPU (`--gpus`)"
    if slots > 1:
        return (f"{slots} at a time on the CPU (`--parallel {slots}`): concurrent trials share the machine's memory "
                "bandwidth and caches, so their timings are not those of a trial alone")
    return "one trial at a time"


def experiment_settings(record: dict[str, Any]) -> dict[str, Any]:
    """What makes a trial this experiment: the settings of its hash (harness.bench.config_hash) but the
    seed, which the table aggregates over. Trials are grouped only with identical ones."""
    config = (record.get("result") or {}).get("config") or {}
    settings = {k: v for k, v in config.items() if k not in LOCATION_SETTINGS and k != "seed"}
    settings["bench_cpu_threads"] = record.get("cpu_threads")  # it changes the timings
    return settings


def ok_rows(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row per trial that finished ok, each knowing its experiment (its settings but the seed). Rows
    that would read alike but differ in some setting (e.g. a sweep rerun with another budget into the
    same results folder) name the settings that differ in their `settings` cell."""
    rows = []
    for record in trials:
        if record["status"] != "ok":
            continue
        row = trial_row(record)
        settings = experiment_settings(record)
        row["_settings"] = settings
        row["_experiment"] = json.dumps(settings, sort_keys=True, default=str)
        rows.append(row)
    alike: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        alike.setdefault((row["recipe"], row["method"], row[RANK_HEADER], row["settings"]), []).append(row)
    for group in alike.values():
        configs = [row["_settings"] for row in group]
        differing = sorted({k for c in configs for k in c if any(other.get(k) != c.get(k) for other in configs)})
        for row in group:
            extra = ", ".join(f"{k}={row['_settings'].get(k)}" for k in differing)
            if extra:
                row["settings"] = f"{row['settings']}, {extra}" if row["settings"] else extra
    _add_gain_over_baseline(rows)
    return rows


def _add_gain_over_baseline(rows: list[dict[str, Any]]) -> None:
    """Each trial's accuracy minus its baseline's (the untrained model on the same eval set, model and
    quantization), and whether that gain is larger than the two measurements' sampling noise: |gain| >
    1.96 x sqrt(SE_trial^2 + SE_baseline^2), the binomial standard errors of the two accuracies."""
    baselines = {row["_scored_on"]: row for row in rows if row["method"] == BASELINE and row["_scored_on"]}
    accuracy, se = eval_name("accuracy"), eval_name("accuracy_se")
    for row in rows:
        base = baselines.get(row["_scored_on"])
        if row["method"] == BASELINE or base is None or row.get(accuracy) is None or base.get(accuracy) is None:
            continue
        row[GAIN] = row[accuracy] - base[accuracy]
        row[NOISE] = "yes" if gain_beyond_noise(row[GAIN], row.get(se), base.get(se)) else "within noise"


def gain_beyond_noise(gain: float, se: float | None, baseline_se: float | None) -> bool:
    """Whether a difference of two accuracies exceeds 1.96 x their combined binomial standard error."""
    return abs(gain) > 1.96 * math.sqrt((se or 0) ** 2 + (baseline_se or 0) ** 2)


def noise_verdict(gain: float, se: float | None, baseline_se: float | None) -> str:
    """The words a run's before/after line gives its gain (gain_beyond_noise)."""
    return ("beyond noise" if gain_beyond_noise(gain, se, baseline_se)
            else "within noise: more steps or more held-out examples would tell")


def _number_format(column: str) -> str:
    return METRIC_FORMATS.get(column, EVAL_FORMAT)


def _format_values(column: str, values: list[Any]) -> str:
    """One cell: the value, or mean ± sample std over seeds when they differ; blank when not measured."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return ""
    if not all(isinstance(v, (int, float)) for v in present):
        return ", ".join(dict.fromkeys(str(v) for v in present))
    fmt = _number_format(column)
    if len(set(present)) == 1:
        return fmt.format(present[0])
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


# ---------------------------------------------------------------------------- tables

def comparison_table(rows: list[dict[str, Any]]):
    """A row per recipe x rank x settings (seeds aggregated); columns nobody measured are dropped."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    keys = ["recipe", "method", RANK_HEADER, "settings"]
    out = []
    # Seeds are aggregated only over trials of one experiment (identical settings but the seed).
    for _, group in frame.groupby([*keys, "_experiment"], sort=False, dropna=False):
        cells = {k: group[k].iloc[0] for k in keys}
        cells["seeds"] = ",".join(str(s) for s in group["seed"])
        for column in frame.columns:
            if column in keys or column == "seed" or column.startswith("_"):
                continue
            cells[column] = _format_values(column, group[column].tolist())
        out.append(cells)
    table = pd.DataFrame(out)
    if not (table["settings"] != "").any():
        table = table.drop(columns="settings")
    if table["device"].nunique() <= 1:
        table = table.drop(columns="device")  # one device: the header names it
    return table.loc[:, [c for c in table.columns if (table[c] != "").any()]]


def pivot_table(rows: list[dict[str, Any]], metric: str):
    import pandas as pd

    frame = pd.DataFrame(rows)
    if metric not in frame or frame[metric].isna().all():
        return None
    frame["rank"] = [NO_RANK if r == math.inf else f"rank {int(r)}" for r in frame["_rank"]]
    order = sorted(frame["_rank"].unique())
    columns = [NO_RANK if r == math.inf else f"rank {int(r)}" for r in order]
    index = ["recipe"] + (["settings"] if (frame["settings"] != "").any() else [])
    table = frame.pivot_table(index=index, columns="rank", values=metric, aggfunc="mean", sort=False)
    table = table.reindex(columns=columns)
    fmt = _number_format(metric)
    formatted = table.apply(lambda col: [fmt.format(v) if v == v else "" for v in col])
    return formatted.reset_index()


def failures_table(records: list[dict[str, Any]]):
    import pandas as pd

    rows = [
        {
            "trial": r["trial_id"],
            "status": r["status"],
            "reason": " ".join(str(r.get("reason") or "").split()).replace("|", "\\|"),
            "wall (s)": f"{r['wall_seconds']:.1f}" if r.get("wall_seconds") is not None else "",
            "ran on": _ran_on_label(r),
            "log": f"{r['trial_dir']}/trial.log" if r.get("trial_dir") else "",
        }
        for r in records
    ]
    frame = pd.DataFrame(rows)
    return frame if (frame["ran on"] != "").any() else frame.drop(columns="ran on")


def _ran_on_label(record: dict[str, Any]) -> str:
    """Where a trial that did not finish ok ran, when the sweep spread its trials (GPU, Ray host)."""
    ran = record.get("ran_on") or {}
    parts = [ran.get("host") if ran.get("executor") == "ray" else None,
             f"GPU {ran['gpu']}" if ran.get("gpu") is not None else None]
    return " ".join(p for p in parts if p)


def score_column(rows: list[dict[str, Any]]) -> str | None:
    present = {k for row in rows for k, v in row.items() if k.startswith("eval ") and v is not None}
    for name in SCORE_PREFERENCE:
        if name in present:
            return name
    scores = sorted(k for k in present if k != "eval loss")
    return scores[0] if scores else ("eval loss" if "eval loss" in present else None)


# ---------------------------------------------------------------------------- header

def _distinct(values) -> list[str]:
    return sorted({v for v in values if v not in (None, "")})


def model_note(model: str) -> str:
    from harness.offline_models import OFFLINE_MODELS

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
        *dict.fromkeys(r["bench_command"] for r in records),
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
    "process's peak RSS); *planned peak* is what the recipe's memory plan (harness.plan) predicted before loading, "
    "without the CUDA context (for a CPU run, for its fp32 compute), and *measured / planned* checks it against "
    "GPU memory only; *trial process peak RSS* is the same process measured from outside (`wait4`), from "
    "start to exit; *train* is optimizer steps only (no evaluation, no saving), *total* the recipe's whole run "
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

def render(sweep: str, records: list[dict[str, Any]], plots: list[Path]) -> str:
    trials = latest_per_trial(records)
    rows = ok_rows(trials)
    rows.sort(key=lambda row: (row["method"] != BASELINE, _first_seen(trials, row["recipe"]), row["settings"],
                               row["_rank"], row["seed"]))
    lines = header(sweep, trials)
    lines += ["## Comparison", ""]
    if rows:
        lines += [comparison_table(rows).to_markdown(index=False, disable_numparse=True), "", COLUMN_NOTES, ""]
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


def write_report(results_dir: Path, sweep: str, records: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write <results_dir>/<sweep>.md and its plots; returns the files written."""
    results_dir = Path(results_dir)
    if records is None:
        records = read_records(results_dir / RUNS_FILE)
    records = [r for r in trial_records(records) if r.get("sweep") == sweep]
    if not records:
        return []
    from harness.measure import write_text_atomic
    from harness.plots import write_plots

    trials = latest_per_trial(records)
    rows = ok_rows(trials)
    plots = write_plots(rows, results_dir, sweep, score_column(rows)) if rows else []
    path = results_dir / f"{sweep}.md"
    write_text_atomic(path, render(sweep, records, plots))
    return [path, *plots]


SAMPLE_COLUMNS = ("recipe", RANK_HEADER, "peak memory (MiB)", PLANNED, PLANNED_RATIO, "train (s)", "tokens/s", "trainable params",
                  "adapter (MiB)", "eval loss")


def sample_table(records: list[dict[str, Any]], sweep: str) -> str:
    """The headline columns of a sweep's comparison table, e.g. for the README."""
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
    parser.add_argument("--results-dir", default=str(REPO_ROOT / "results"), help="Folder holding runs.jsonl.")
    parser.add_argument("--sweep", action="append", default=None, help="Only this sweep (repeatable). Unset: all.")
    parser.add_argument("--sample", metavar="SWEEP", help="Print the headline columns of this sweep's table instead "
                        "(the README's sample) and write nothing.")
    with reported_as_one_line("report"):
        args = parser.parse_args(argv)
        results_dir = Path(args.results_dir).expanduser()
        runs = results_dir / RUNS_FILE
        if not runs.is_file():
            raise UserError(f"no {RUNS_FILE} in {results_dir}; run python -m harness.bench first or pass --results-dir")
        damaged: list[str] = []
        records = read_records(runs, warn=damaged.append)
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
                written = write_report(results_dir, sweep, records)
            except OSError as exc:
                raise UserError(f"cannot write the tables to {results_dir} ({exc.strerror}); "
                                "pass a --results-dir you can write to") from None
            for path in written:
                print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
