"""From benchmark records to tables: a row per trial (its settings, figures and how it ran), the comparison
table, the pivots by rank, the failures, and whether a gain over the baseline is beyond noise.
harness.reporting.page lays them out as results/<sweep>.md (`python -m harness.report`)."""
from __future__ import annotations

import json
import math
from typing import Any

from harness.reporting.flops import mfu_percent
from harness.reporting.runs import LOCATION_SETTINGS, TRIAL_FIELDS

MIB = 1024 * 1024
GAIN = "Δ accuracy vs baseline"
NOISE = "beyond noise?"
RANK_HEADER = "rank (r / target_r ← init_r)"
NO_RANK = "no rank"
PLANNED = "planned peak (MiB)"
PLANNED_RATIO = "measured / planned"
PREDICTED_TRAIN = "predicted train (s)"  # the time planner's, beside the measured "train (s)" (reporting.page)

# Comparison-table columns after the identifying ones, with their number format.
METRIC_FORMATS: dict[str, str] = {
    "peak memory (MiB)": "{:.1f}",
    PLANNED: "{:.1f}",
    PLANNED_RATIO: "{:.2f}",
    "CUDA reserved (MiB)": "{:.1f}",
    "CUDA allocated (MiB)": "{:.1f}",
    "NVML peak (MiB)": "{:.1f}",
    "trial process peak RSS (MiB)": "{:.1f}",
    "train (s)": "{:.2f}",
    PREDICTED_TRAIN: "{:.2f}",
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
        return f"target_r {setting['target_r']} ← init_r {setting.get('init_r')}"
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
        "NVML peak (MiB)": result.get("nvml_used_mb"),
        "NVML of": result.get("nvml_used_source") or ("device" if result.get("nvml_used_mb") is not None else None),
        "trial process peak RSS (MiB)": record.get("process_peak_rss_mb"),
        "train (s)": result.get("train_seconds") if trained else None,
        PREDICTED_TRAIN: None,  # filled in by harness.reporting.page where the device has a calibration
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
