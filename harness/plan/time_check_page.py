"""The page of harness.plan.time_check: how it was made, the summary, a row per predicted trial, the misses and the
trials not predicted. It renders the rows harness.plan.time_check.predict makes; it counts nothing itself."""
from __future__ import annotations

import statistics

WITHIN = 0.25  # the target: predicted within +-25 % of measured
NOT_COMPARABLE = "not comparable"  # a reason's first words: the record ran on another device than the calibration's


def _distinct(values) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if v not in (None, "")))


def _header(records: list[dict], calibration, command: str) -> list[str]:
    from harness.models.offline import OFFLINE_MODELS

    results = [r.get("result") or {} for r in records]
    made = _distinct([r.get("bench_command") or r.get("command") for r in records])
    models = _distinct(r.get("model") or (r.get("result") or {}).get("model") for r in records)
    weights = {m: next((res.get("model_weights") for r, res in zip(records, results)
                        if res.get("model_weights") and r.get("model") == m), None) or OFFLINE_MODELS.get(m)
               for m in models}
    commits = _distinct(((res.get("git") or {}).get("commit") or "unknown")
                        + (" (with uncommitted changes)" if (res.get("git") or {}).get("dirty") else "")
                        for res in results if res)
    versions = _distinct(", ".join(f"{k} {v}" for k, v in (res.get("versions") or {}).items()) for res in results)
    lines = ["# Predicted vs measured train time", "", "Made with (from the repository root):", "", "```", command,
             "```", "", "The trials were measured with:", "", "```", *made, "```", "",
             f"- **Device** (of the trials): {'; '.join(_distinct(r.get('device') for r in results)) or 'unknown'}.",
             "- **Model**: " + "; ".join(f"`{m}` ({weights[m] or 'weights not described'})" for m in models) + ".",
             f"- **Commit** (of the trials): {'; '.join(commits) or 'unknown'}.",
             f"- **Versions** (of the trials): {'; '.join(versions) or 'unknown'}."]
    lines.append(f"- **Speed**: {_calibration_line(calibration)}")
    lines += ["- **Measured**: the trial's train_seconds (optimizer steps only: no evaluation, no saving). "
              "**Predicted**: the time planner's model (harness/plan/work.py counts one step's work on the meta "
              "model, harness/plan/timing.py turns it into seconds) on the trial's own settings, at its rows' real "
              "lengths where its data and tokenizer are here (tokenized as its run tokenized them, batched as it "
              "batched them: harness/plan/batches.py), times its steps; "
              "the range is the planner's own (RANGE_FACTOR). **Error**: predicted / measured - 1.", ""]
    return lines


def _calibration_line(calibration) -> str:
    if calibration is None:
        return "each device's calibration in results/gpu/, else a listed GPU's data sheet."
    import json

    try:
        record = json.loads(calibration.path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    provenance = record.get("provenance") or {}
    skinny = calibration.skinny_flops_per_second
    threads = f"threads {calibration.threads}" if calibration.threads is not None else "a GPU"
    return (f"calibration `{calibration.path}` of {calibration.device} ({record.get('mode', '?')} mode, "
            f"{calibration.dtype}, {threads}): "
            f"matmul {calibration.matmul_flops_per_second / 1e9:.1f} GFLOP/s (step-weighted)"
            + (f", skinny (LoRA-rank) matmul {skinny / 1e9:.1f} GFLOP/s" if skinny else "")
            + f", bandwidth {calibration.bandwidth_bytes_per_second / 1e9:.1f} GB/s; measured "
            f"{provenance.get('date', '?')} at commit {provenance.get('commit', '?')} with "
            f"`{provenance.get('command', '?')}`.")


def _parts(estimates) -> tuple[float, float, float]:
    """Shares of compute, memory and overhead in the predicted seconds of these step estimates."""
    total = sum(e.seconds for e in estimates) or 1.0
    return (sum(e.compute_seconds for e in estimates) / total, sum(e.memory_seconds for e in estimates) / total,
            sum(e.overhead_seconds for e in estimates) / total)


def markdown(rows: list[dict], records: list[dict], calibration, command: str) -> str:
    """The whole page: how it was made, the summary, a row per predicted trial, the misses and the rest."""
    predicted = [r for r in rows if "predicted" in r]
    hits = [r for r in predicted if abs(r["error"]) <= WITHIN]
    plain = [r for r in predicted if not r["notes"]]
    ratios = sorted(r["measured"] / r["predicted"] for r in predicted)
    apart = [r for r in rows if str(r.get("reason", "")).startswith(NOT_COMPARABLE)]
    skipped = [r for r in rows if "predicted" not in r and r not in apart]
    lines = _header(records, calibration, command) + ["## Summary", ""]
    if predicted:
        compute, memory, overhead = _parts([r["estimate"] for r in predicted])
        lines += [f"- **Within ±{WITHIN:.0%}**: {len(hits)} of {len(predicted)} predicted trials "
                  f"({len(hits) / len(predicted):.0%}); of the {len(plain)} with nothing noted against them (same "
                  f"threads as the calibration, nothing uncounted): "
                  f"{sum(abs(r['error']) <= WITHIN for r in plain)}.",
                  f"- **Measured / predicted**: median {statistics.median(ratios):.2f}, min {ratios[0]:.2f}, "
                  f"max {ratios[-1]:.2f} (above 1: the trial ran slower than predicted).",
                  f"- **What the prediction is made of** (shares of all predicted seconds): compute {compute:.0%}, "
                  f"memory traffic {memory:.0%}, fixed and per-op overhead {overhead:.0%}."]
    else:
        lines.append("- No trial could be predicted (reasons below).")
    lines += [f"- **Not comparable** (another device than the calibration's): {len(apart)}; **not predicted**: "
              f"{len(skipped)} (listed below, not counted in the share).", "",
              "## Per trial", "",
              "| sweep | recipe | method | rank | seed | threads | steps | measured (s) | predicted (s) (low-high) | "
              "error | within ±25%? | compute | memory | overhead |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in predicted:
        compute, memory, overhead = _parts([r["estimate"]])
        lines.append(f"| {r['sweep']} | {r['recipe']} | {r['method']} | {_blank(r['rank'])} | {_blank(r['seed'])} | "
                     f"{_blank(r['threads'])} | {r['steps']} | {r['measured']:.1f} | {r['predicted']:.1f} "
                     f"({r['low']:.1f}-{r['high']:.1f}) | {r['error']:+.0%} | "
                     f"{'yes' if abs(r['error']) <= WITHIN else 'no'} | {compute:.0%} | {memory:.0%} | "
                     f"{overhead:.0%} |")
    misses = [r for r in predicted if abs(r["error"]) > WITHIN]
    lines += ["", f"## Misses (outside ±{WITHIN:.0%})", ""]
    lines += [f"- {r['trial']}: measured / predicted {r['measured'] / r['predicted']:.2f} "
              f"({'slower' if r['error'] < 0 else 'faster'} than predicted; {_dominant(r['estimate'])}); "
              + "; ".join(r["notes"] or ["nothing in the record sets it apart from the hits"]) for r in misses] or [
        "None."]
    lines += ["", "Not counted by the model for any trial (harness/plan/work.py): the Python of the model's "
              "modules and the Trainer beyond the fixed per-step and per-micro-batch overheads, GRPO's generation, "
              "AdaLoRA's periodic rank reallocation; nor what else the machine "
              "ran beside the trial."]
    if apart:
        lines += ["", "## Not comparable", ""] + [f"- {r['trial']} ({r['device']}): {r['reason']}" for r in apart]
    if skipped:
        lines += ["", "## Not predicted", ""] + [f"- {r['trial']} ({r['device'] or 'no device'}): {r['reason']}"
                                                 for r in skipped]
    return "\n".join(lines) + "\n"


def _dominant(estimate) -> str:
    """The part that makes most of a prediction, and whether that part's figures are measured or estimated."""
    share, name = max(zip(_parts([estimate]), ("compute", "memory traffic", "overhead")))
    source = {"compute": "at the calibrated matmul rate", "memory traffic": "at the calibrated bandwidth",
              "overhead": "fixed per-step and per-op costs: estimated, not fitted (harness/plan/timing.py)"}[name]
    return f"the prediction is {share:.0%} {name}, {source}"


def _blank(value) -> str:
    return "" if value is None else str(value)
