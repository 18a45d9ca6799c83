"""A markdown summary of one run's result.json, for results/.

    python -m harness.summary outputs/qwen2_7b_adalora/result.json --out results/qwen2_7b_adalora_stories260k.md

Every figure comes from the record; nothing is typed in.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import write_text_atomic


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    from tabulate import tabulate

    return tabulate([(k, _fmt(v)) for k, v in rows], headers=["", "value"], tablefmt="github")


def _rank_pivot(ranks: dict[str, int]) -> str:
    """Final AdaLoRA ranks as layer x projection."""
    import pandas as pd

    rows = []
    for name, rank in ranks.items():
        match = re.search(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)$", name)
        if match:
            rows.append({"layer": int(match.group(1)), "module": match.group(2), "rank": rank})
    if not rows:
        return ""
    frame = pd.DataFrame(rows).pivot(index="layer", columns="module", values="rank")
    order = [m for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") if m in frame]
    frame = frame[order + [m for m in frame.columns if m not in order]]
    frame["layer total"] = frame.sum(axis=1)
    return frame.to_markdown()


def evaluation_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per evaluation, in order: the Trainer logs eval_loss and the task scores as separate entries."""
    rows: list[dict[str, Any]] = []
    trained = False
    for entry in history:
        if "train_loss" in entry:  # the end-of-training summary entry
            trained = True
        elif "eval_loss" in entry:
            when = f"{entry.get('step')} (final, best checkpoint restored)" if trained else entry.get("step")
            if entry.get("step") == 0:
                when = "0 (untrained: the baseline)"
            rows.append({"when": when, **entry})
        elif rows and any(k.startswith("eval_") for k in entry):
            rows[-1].update(entry)
    return rows


def _processes(record: dict[str, Any]) -> str:
    """', 2 processes (ddp over gloo), peak memory the largest of theirs' for a run of several processes."""
    launch = record.get("distributed") or {}
    if launch.get("processes", 1) == 1:
        return ""
    return (f", {launch['processes']} processes ({launch.get('strategy')} over {launch.get('backend')}; peak "
            "memory is the largest process's)")


def render(record: dict[str, Any]) -> str:
    memory_label = {
        "cuda_reserved": "peak GPU memory reserved above the post-init baseline (MB)",
        "cpu_rss": "peak CPU resident memory of the process (MB)",
    }.get(record.get("peak_memory_kind"), f"peak memory ({record.get('peak_memory_kind')}, MB)")
    eval_scores = record.get("eval") or {}
    lines = [
        f"# {record.get('recipe')} on {record.get('model')}",
        "",
        *([f"Model weights: {record['model_weights']}", ""] if record.get("model_weights") else []),
        f"Status: **{record.get('status')}**. Device: {record.get('device')}{_processes(record)}. "
        f"Commit: `{(record.get('git') or {}).get('commit')}`"
        + (" (with uncommitted changes)" if (record.get("git") or {}).get("dirty") else "")
        + f". Started {record.get('started_at')}.",
        "",
        "Repeat it from the repository root with:",
        "",
        "```",
        record.get("command", ""),
        "```",
        "",
        "## Headline",
        "",
        _table([
            ("method", record.get("method")),
            ("quantization", record.get("quantization")),
            (memory_label, record.get("peak_memory_mb")),
            ("training seconds (optimizer steps only)", record.get("train_seconds")),
            ("total seconds (load + train + eval + save)", record.get("total_seconds")),
            ("optimizer steps", record.get("global_step")),
            ("non-padding tokens trained on", record.get("tokens_trained")),
            ("tokens / second", record.get("tokens_per_second")),
            ("trainable parameters", record.get("trainable_params")),
            ("total parameters", record.get("total_params")),
            ("trainable %", record.get("trainable_percent")),
            *([("saved model bytes (full fine-tuning)", record["model_bytes"])] if "model_bytes" in record
              else [("adapter file bytes", record.get("adapter_bytes"))]),
            ("train loss (mean over the run)", record.get("train_loss")),
            ("eval loss (restored best checkpoint)", record.get("eval_loss")),
            *[(f"untrained (baseline, step 0) {k}", v) for k, v in (record.get("before_training") or {}).items()
              if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")
              or (record.get("objective") in ("dpo", "grpo") and isinstance(v, (int, float)))],
            *[(f"eval {k}", v) for k, v in eval_scores.items() if not isinstance(v, (dict, list))
              and k != "example_answer"],
            *[(f"GRPO {k.replace('_', ' ')}", v) for k, v in (record.get("grpo") or {}).items() if not isinstance(v, list)],
            *[(f"data: {k.replace('_', ' ')}", v) for k, v in (record.get("data") or {}).items()
              if record.get("objective") in ("dpo", "grpo") and isinstance(v, int)],
            *([("forgetting: change of the loss on general text the run never trained on",
                (record.get("forgetting") or {}).get("delta"))] if record.get("forgetting") else []),
        ]),
        "",
    ]
    distribution = eval_scores.get("predicted_distribution")
    if distribution:
        lines += [f"Predicted labels on the validation split: {json.dumps(distribution)}."]
        gold = eval_scores.get("gold_distribution")
        if gold:
            lines += [f"True labels: {json.dumps(gold)} (always answering the most common label scores "
                      f"{max(gold.values()) / sum(gold.values()):.2f} accuracy)."]
        lines += [""]
    evals = evaluation_rows(record.get("log_history", []))
    if evals:
        from tabulate import tabulate

        keys = [k for k in ("eval_loss", "eval_answer_token_accuracy", "eval_accuracy", "eval_macro_f1")
                if any(k in row for row in evals)]
        lines += [
            "## Evaluations",
            "",
            tabulate([[row["when"]] + [_fmt(row.get(k)) for k in keys] for row in evals],
                     headers=["step", *keys], tablefmt="github"),
            "",
        ]
    rewards = [row for row in record.get("log_history", []) if "reward" in row]
    if rewards:
        from tabulate import tabulate

        keys = [k for k in rewards[0] if k == "reward" or k.startswith("rewards/") and k.endswith("/mean")
                or k == "completions/mean_length"]
        lines += [
            "## Mean reward of every step (GRPO)",
            "",
            tabulate([[row.get("step")] + [_fmt(row.get(k)) for k in keys] for row in rewards],
                     headers=["step", *keys], tablefmt="github"),
            "",
        ]
    examples = [(when, (part or {}).get("example_answer")) for when, part in
                (("untrained", record.get("before_training")), ("trained", eval_scores))]
    if any(text for _, text in examples):
        lines += ["## The first held-out problem's greedy answer", ""]
        for when, text in examples:
            lines += [f"{when}:", "", "```", str(text), "```", ""]
    adalora = record.get("adalora")
    if adalora:
        lines += [
            "## AdaLoRA rank allocation",
            "",
            f"Schedule: {json.dumps(adalora['schedule'])}. Total rank {adalora['total_rank']} over "
            f"{adalora['modules']} modules (started at {adalora['initial_budget']}, target "
            f"{adalora['target_budget']}).",
            "",
            _rank_pivot(adalora["ranks"]),
            "",
        ]
    versions = record.get("versions") or {}
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = OneLineArgumentParser(prog="python -m harness.summary", description=__doc__.split("\n")[0])
    parser.add_argument("result", help="a result.json written by a recipe")
    parser.add_argument("--out", help="markdown file to write (default: print)")
    with reported_as_one_line("summary"):
        args = parser.parse_args(argv)
        path = Path(args.result)
        if not path.is_file():
            raise UserError(f"{path} not found; pass the result.json of a run")
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise UserError(f"{path} is not valid JSON; pass the result.json of a run") from None
        if not isinstance(record, dict) or "status" not in record:
            raise UserError(f"{path} is not a run's record (no status field); pass the result.json of a run")
        text = render(record)
        if args.out:

            write_text_atomic(Path(args.out), text)
        else:
            print(text)


if __name__ == "__main__":
    main()
