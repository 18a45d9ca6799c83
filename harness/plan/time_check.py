"""How good is the time planner? Predict the train time of every trial already measured, and compare.

    python -m harness.plan.time_check                                   # results/runs.jsonl, results/gpu/
    python -m harness.plan.time_check --runs results/runs.jsonl --calibration results/gpu/calibration-cpu-x.json
    ... --output FILE (a markdown table; default: stdout)

For each trial record (harness.reporting.runs; written by harness.bench) it rebuilds the run's settings from
the record's own config (result.config, every setting flat, as harness.run.record writes it), counts the work
of one optimizer step on the same meta model the planner builds (harness.plan.work.step_work), turns it into
seconds with the device's speed (harness.plan.timing: the --calibration file, else the device's calibration in
results/gpu/, else a listed GPU's data sheet) and multiplies by the steps the trial ran. Measured is the trial's
train_seconds (the optimizer steps alone: harness.run.training.TrainClock; no evaluation, no saving).

Records it cannot predict are listed below the table with the reason (not a trial that trained, GRPO's
generation, a device with no speed known, a model whose config is not available offline) and are not counted
in the share within +-25 %.
"""
from __future__ import annotations

import sys
from pathlib import Path

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.locations import RESULTS_DIR

WITHIN = 0.25  # the target: predicted within +-25 % of measured
# The training settings the work of a step depends on (harness.plan.work, harness.plan.memory): only these are
# taken from a record's training settings, the rest of which (accelerator objects written as text, hub tokens)
# would not parse back.
_TRAINING_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "max_grad_norm",
                      "activation_checkpointing", "max_steps", "bf16", "fp16", "packing", "padding_free",
                      "precompute_ref_log_probs", "max_length")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported_as_one_line("time_check"):
        args = _parse(argv)
        runs = Path(args.runs)
        if not runs.is_file():
            raise UserError(f"--runs {runs}: no such file; give a runs.jsonl that harness.bench wrote "
                            "(results/runs.jsonl)")
        if args.calibration and not Path(args.calibration).is_file():
            raise UserError(f"--calibration {args.calibration}: no such file; write one with "
                            "python -m harness.plan.calibrate --output DIR")
        output = Path(args.output) if args.output else None
        if output is not None and output.is_dir():
            raise UserError(f"--output {output} is a folder; give a file name")
        if output is not None and not output.parent.is_dir():
            raise UserError(f"--output {output}: folder {output.parent} does not exist; make it first or write "
                            "elsewhere")
        from harness.models.loading import quiet_libraries
        from harness.reporting.runs import read_records, trial_record_problem

        records = read_records(runs, check=trial_record_problem)
        calibration = _calibration(Path(args.calibration)) if args.calibration else None
        with quiet_libraries():
            rows = [predict(record, calibration) for record in records]
        text = markdown(rows, runs, calibration)
        if output is None:
            print(text, end="")
        else:
            from harness.files import write_text_atomic

            write_text_atomic(output, text)
            print(f"wrote {output}")
    return 0


def _parse(argv: list[str]):
    parser = OneLineArgumentParser(prog="python -m harness.plan.time_check",
                                   description="Predicted vs measured train time of every trial in a runs.jsonl.")
    parser.add_argument("--runs", default=str(RESULTS_DIR / "runs.jsonl"), help="the trial records to predict")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="a calibration file to use for the records of its device (default: results/gpu/)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the markdown table here "
                                                                       "(default: stdout)")
    return parser.parse_args(argv)


def _calibration(path: Path):
    """The calibration in FILE, read as the planner reads it (harness.plan.speeds.load_calibration, which finds
    a device's file by its name: the file must keep the name calibrate gave it)."""
    import json

    from harness.plan.speeds import device, load_calibration

    try:
        measured = (json.loads(path.read_text(encoding="utf-8")) or {}).get("device") or {}
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise UserError(f"--calibration {path}: not a readable calibration ({type(exc).__name__}); write one with "
                        "python -m harness.plan.calibrate --output DIR") from None
    spec = f"cpu {measured.get('name', '')}" if measured.get("kind") == "cpu" else str(measured.get("name", ""))
    expected = f"calibration-{device(spec).slug}.json"
    if path.name != expected:
        raise UserError(f"--calibration {path}: a calibration of {spec!r} is named {expected}; keep the name "
                        "python -m harness.plan.calibrate gave it")
    return load_calibration(spec, path.parent)


def predict(record: dict, calibration=None) -> dict:
    """One row: the trial, its measured and predicted train seconds, or the reason it cannot be predicted."""
    result = record.get("result") or {}
    row = {"trial": f"{record.get('sweep')}/{record.get('trial_id')}", "device": result.get("device") or "",
           "steps": result.get("global_step"), "measured": result.get("train_seconds")}
    config = result.get("config") or {}
    if record.get("status") != "ok":
        return {**row, "reason": f"status {record.get('status')}: no train time"}
    if not row["steps"] or not row["measured"]:
        return {**row, "reason": "trained no step (a baseline or an empty run)"}
    if not config:
        return {**row, "reason": "the record has no config to rebuild the run from"}
    if (config.get("objective") or "sft") == "grpo":
        return {**row, "reason": "GRPO: the generation of completions is not modelled"}
    if not row["device"]:
        return {**row, "reason": "the record names no device"}
    try:
        speed = _speed(row["device"], config, record.get("cpu_threads"), calibration)
        cfg = run_config(config)
        from harness.plan.architectures import model_config
        from harness.plan.timing import step_seconds
        from harness.plan.work import step_work

        model = model_config(cfg.model.model, cfg.model.trust_remote_code)
        work = step_work(cfg, model, compute_dtype=_compute_dtype(cfg, row["device"]))
    except UserError as exc:
        return {**row, "reason": str(exc)}
    estimate = step_seconds(work, speed, micro_batches=cfg.train.gradient_accumulation_steps)
    predicted = estimate.seconds * row["steps"]
    return {**row, "predicted": predicted, "error": predicted / row["measured"] - 1, "estimate": estimate}


def _speed(device_name: str, config: dict, threads, calibration):
    from harness.plan.speeds import device, require_speed
    from harness.plan.timing import speed_from

    found = device(device_name)
    dtype = str(_compute_dtype_named(config, found.kind))
    if calibration is not None:
        measured = device(f"cpu {calibration.device}" if calibration.threads is not None else calibration.device)
        if measured.slug != found.slug:
            raise UserError(f"no calibration for {device_name} (the one given is of {calibration.device})")
        peak = found.gpu.speed if found.gpu is not None else None
        return speed_from(peak, calibration, dtype, found.kind, threads if isinstance(threads, int) else None)
    peak, own = require_speed(device_name, option="device")
    return speed_from(peak, own, dtype, found.kind, threads if isinstance(threads, int) else None)


def _compute_dtype_named(config: dict, kind: str) -> str:
    """The dtype a run's matmuls ran in: --dtype when given, else mixed precision's, else the loader's auto
    (float32 on a CPU, bfloat16 on a GPU: harness.models.loading)."""
    if config.get("dtype") in ("bfloat16", "float16", "float32"):
        return config["dtype"]
    if config.get("bf16"):
        return "bfloat16"
    if config.get("fp16"):
        return "float16"
    return "float32" if kind == "cpu" else "bfloat16"


def _compute_dtype(cfg, device_name: str):
    import torch

    from harness.plan.speeds import device

    config = {"dtype": cfg.model.dtype, "bf16": cfg.train.bf16, "fp16": cfg.train.fp16}
    return getattr(torch, _compute_dtype_named(config, device(device_name).kind))


def run_config(config: dict):
    """A RunConfig from a record's flat config (RunConfig.to_dict): its model, data, method and run settings as
    they are, and the training settings the work of a step depends on, parsed as a recipe parses them."""
    import dataclasses

    from harness.run.command_line import parse_args
    from harness.run.config import ARGUMENT_CLASSES

    names = {f.name for cls in ARGUMENT_CLASSES[:-1] for f in dataclasses.fields(cls) if f.init}
    defaults = {k: v for k, v in config.items() if k in names and v is not None}
    defaults.update({k: config[k] for k in _TRAINING_SETTINGS if config.get(k) is not None})
    defaults["objective"] = config.get("objective") or "sft"
    defaults["output_dir"] = "outputs/plan"  # never written: parsing a run's settings needs one
    return parse_args(defaults, [])


def markdown(rows: list[dict], runs: Path, calibration) -> str:
    predicted = [r for r in rows if "predicted" in r]
    hits = [r for r in predicted if abs(r["error"]) <= WITHIN]
    lines = [f"# Predicted vs measured train time: {runs}", "",
             "Measured: the trial's train_seconds (optimizer steps only). Predicted: `python -m harness.plan` time "
             "model (harness/plan/timing.py) on the trial's own settings, times its steps."
             + (f" Speed: {calibration.path.name}." if calibration is not None else ""), "",
             f"Within +-{WITHIN:.0%}: {len(hits)} of {len(predicted)} predicted trials"
             + (f" ({len(hits) / len(predicted):.0%})" if predicted else "")
             + f"; {len(rows) - len(predicted)} records not predicted (listed below).", "",
             "| trial | device | steps | measured s | predicted s | error | compute s/step | memory s/step | "
             "overhead s/step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in predicted:
        e = r["estimate"]
        lines.append(f"| {r['trial']} | {r['device']} | {r['steps']} | {r['measured']:.1f} | {r['predicted']:.1f} | "
                     f"{r['error']:+.0%} | {e.compute_seconds:.3f} | {e.memory_seconds:.3f} | "
                     f"{e.overhead_seconds:.3f} |")
    skipped = [r for r in rows if "predicted" not in r]
    if skipped:
        lines += ["", "Not predicted:", ""] + [f"- {r['trial']} ({r['device'] or 'no device'}): {r['reason']}"
                                               for r in skipped]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
