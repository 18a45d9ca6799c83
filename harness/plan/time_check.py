"""How good is the time planner? Predict the train time of every trial already measured, and compare.

    python -m harness.plan.time_check                                   # results/runs.jsonl, results/gpu/
    python -m harness.plan.time_check --runs results/runs.jsonl --calibration results/gpu/calibration-cpu-x.json
    ... --runs FILE (repeatable), --result FILE (a single run's result.json, repeatable: the DPO and GRPO runs),
    ... --packing FILE (a harness.bench.packing_timing JSON, repeatable: each of its runs a trial)
    ... --output FILE.md (written whole; --overwrite to replace it; default: stdout)

For each trial record (harness.reporting.runs; written by harness.bench) it rebuilds the run's settings from
the record's own config (result.config, every setting flat, as harness.run.record writes it), counts the work
of one optimizer step on the same meta model the planner builds (harness.plan.work.step_work; an SFT trial's at
its rows' real lengths, its data tokenized as its run tokenized them and batched as it batched them, where its
data file and tokenizer are here: harness.plan.batches), turns it into
seconds with the device's speed (harness.plan.timing: the --calibration file, else the device's calibration in
results/gpu/, else a listed GPU's data sheet) and multiplies by the steps the trial ran. Measured is the trial's
train_seconds (the optimizer steps alone: harness.run.training.TrainClock; no evaluation, no saving).

A record of another device than the --calibration's is listed as not comparable (never predicted with another
device's speed); records it cannot predict are listed with the reason (not a trial that trained, GRPO's
generation, a device with no speed known, a model whose config is not available offline). Neither is counted in
the share within +-25 %. predict() is the one prediction of a record; harness.reporting.page calls it for the
"predicted train (s)" column of the benchmark tables.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from harness.errors import OneLineArgumentParser, UserError, reported_as_one_line
from harness.files import output_file, write_or_print
from harness.locations import RESULTS_DIR
from harness.plan.time_check_page import NOT_COMPARABLE, markdown

COMMAND = "python -m harness.plan.time_check"
# The training settings the work of a step depends on (harness.plan.work, harness.plan.memory): only these are
# taken from a record's training settings, the rest of which (accelerator objects written as text, hub tokens)
# would not parse back.
_TRAINING_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "optim", "max_grad_norm",
                      "activation_checkpointing", "max_steps", "bf16", "fp16", "packing", "padding_free",
                      "precompute_ref_log_probs", "max_length", "packing_strategy", "pad_to_multiple_of", "seed")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with reported_as_one_line("time_check"):
        args = _parse(argv)
        runs = [Path(p) for p in args.runs or [RESULTS_DIR / "runs.jsonl"]]
        for path in runs:
            if not path.is_file():
                raise UserError(f"--runs {path}: no such file; give a runs.jsonl that harness.bench wrote "
                                "(results/runs.jsonl)")
        results = [Path(p) for p in args.result]
        if args.calibration and not Path(args.calibration).is_file():
            raise UserError(f"--calibration {args.calibration}: no such file; write one with "
                            f"python -m harness.plan.calibrate --output DIR")
        output = output_file(args.output, args.overwrite)
        from harness.reporting.runs import read_records, trial_record_problem

        singles = [_result_record(path) for path in results]  # refused before anything is counted
        singles += [record for path in args.packing for record in _packing_records(Path(path))]
        records = [r for path in runs for r in read_records(path, check=trial_record_problem)] + singles
        calibration = _calibration(Path(args.calibration)) if args.calibration else None
        rows = [predict(record, calibration) for record in records]
        text = markdown(rows, records, calibration, f"{COMMAND} {shlex.join(argv)}".strip())
        write_or_print(text, output)
    return 0


def _parse(argv: list[str]):
    parser = OneLineArgumentParser(prog=COMMAND,
                                   description="Predicted vs measured train time of every trial in a runs.jsonl.")
    parser.add_argument("--runs", action="append", default=None, metavar="FILE",
                        help="trial records to predict (repeatable; default: results/runs.jsonl)")
    parser.add_argument("--result", action="append", default=[], metavar="FILE",
                        help="a single run's result.json to predict too (repeatable), e.g. "
                             "results/smollm2-135m_dpo/result.json")
    parser.add_argument("--packing", action="append", default=[], metavar="FILE",
                        help="the runs of a harness.bench.packing_timing JSON to predict too (repeatable), e.g. "
                             "results/time_check/packing.json")
    parser.add_argument("--calibration", default=None, metavar="FILE",
                        help="a calibration file to use for the records of its device (default: results/gpu/)")
    parser.add_argument("--output", default=None, metavar="FILE", help="write the markdown here (default: stdout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return parser.parse_args(argv)


def _result_record(path: Path) -> dict:
    """A single run's result.json (harness.run.record) as the trial record time_check reads: the run's folder
    names it (its CPU threads: what it recorded, none before they were recorded)."""
    import json

    if not path.is_file():
        raise UserError(f"--result {path}: no such file; give a run's result.json")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"--result {path}: not readable JSON ({type(exc).__name__}); give a run's "
                        "result.json") from None
    if not isinstance(result, dict) or not isinstance(result.get("config"), dict) or "train_seconds" not in result:
        raise UserError(f"--result {path}: not a run's result.json (no config or train_seconds); give the "
                        "result.json a recipe wrote")
    config = result["config"]
    return {"sweep": path.parent.name, "trial_id": path.name, "status": result.get("status"),
            "recipe": result.get("recipe"), "method": result.get("method"), "model": config.get("model"),
            "rank": config.get("r"), "seed": config.get("seed"), "cpu_threads": result.get("cpu_threads"),
            "result": result,
            "command": result.get("command")}


def _packing_records(path: Path) -> list[dict]:
    """Each run of a harness.bench.packing_timing JSON as a trial record: the way it batched names it. Runs written
    before packing_timing kept their settings (no config) are listed as not predicted."""
    import json

    if not path.is_file():
        raise UserError(f"--packing {path}: no such file; give the .json that harness.bench.packing_timing wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = data["runs"]
        if not isinstance(runs, dict):
            raise TypeError("runs")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--packing {path}: not a packing_timing JSON ({type(exc).__name__}); give the .json that "
                        "harness.bench.packing_timing wrote") from None
    records = []
    for way, trials in runs.items():
        for number, trial in enumerate(trials or [], start=1):
            config = trial.get("config") or {}
            result = {**trial, "device": data.get("device"), "git": data.get("git"), "versions": data.get("versions"),
                      "model": data.get("model"), "config": config}
            records.append({"sweep": path.stem, "trial_id": f"{way} #{number}", "status": "ok",
                            "recipe": config.get("recipe"), "method": way, "model": data.get("model"),
                            "rank": config.get("r"), "seed": config.get("seed"), "cpu_threads": data.get("cpu_threads"),
                            "result": result, "command": data.get("command")})
    return records


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


def predict(record: dict, calibration=None, folder: Path | None = None, calibrated_only: bool = False) -> dict:
    """One trial record's row: what it is, its measured train seconds, and either its predicted train seconds
    ("predicted", "low", "high", "estimate": the harness.plan.timing.Estimate of one step, whose compute, memory
    and overhead parts say what dominates; "notes": what weakens the comparison) or the "reason" it is not
    predicted. The speed: `calibration` (a harness.plan.speeds.Calibration; a record of another device is not
    comparable), else the device's calibration file in `folder` (default results/gpu/), else, unless
    calibrated_only, a listed GPU's data sheet."""
    result = record.get("result") or {}
    config = result.get("config") or {}
    row = {"trial": f"{record.get('sweep')}/{record.get('trial_id')}", "sweep": record.get("sweep"),
           "recipe": record.get("recipe") or result.get("recipe"), "method": record.get("method"),
           "rank": record.get("rank"), "seed": record.get("seed"), "threads": record.get("cpu_threads"),
           "device": result.get("device") or "", "steps": result.get("global_step"),
           "measured": result.get("train_seconds")}
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
    if row["device"].strip().lower() == "cpu":  # "cpu" alone would mean the CPU this runs on, not the trial's
        return {**row, "reason": "the record names no CPU model (device 'cpu'), so no calibration fits it"}
    try:
        speed, notes = _speed(row["device"], config, row["threads"], calibration, folder, calibrated_only)
        cfg = run_config(config)
        from harness.models.loading import quiet_libraries
        from harness.plan.architectures import model_config
        from harness.plan.timing import step_seconds
        from harness.plan.work import step_work

        with quiet_libraries():  # the libraries' notes while a meta model is built are not the reader's concern
            model = model_config(cfg.model.model, cfg.model.trust_remote_code)
            batch, why_not = _data_batch(cfg)
            work = step_work(cfg, model, compute_dtype=_compute_dtype(cfg, row["device"]), batch=batch)
    except UserError as exc:
        return {**row, "reason": str(exc)}
    estimate = step_seconds(work, speed, micro_batches=cfg.train.gradient_accumulation_steps)
    predicted = estimate.seconds * row["steps"]
    notes += _not_counted(config) + ([f"rows counted at the window: {why_not}"] if why_not else [])
    return {**row, "predicted": predicted, "low": estimate.low * row["steps"], "high": estimate.high * row["steps"],
            "error": predicted / row["measured"] - 1, "estimate": estimate, "notes": notes}


def _not_counted(config: dict) -> list[str]:
    """What the record's settings make the run do that harness.plan.work does not count (its docstring)."""
    return ["AdaLoRA's periodic rank reallocation is not counted"] if config.get("method") == "adalora" else []


_BATCHES: dict[str, tuple] = {}  # by the settings the batches depend on: trials of one sweep share their data


def _data_batch(cfg):
    """(harness.plan.batches.MeanBatch of an SFT record's data, None) where its data file and tokenizer are here:
    the step is then counted at its rows' real lengths, batched as the run batched them; else (None, why not):
    every row at the window, as the planner counts a run before its data are tokenized."""
    if cfg.run.objective != "sft":
        return None, f"{cfg.run.objective}'s rows are not measured by the planner"
    from harness.plan.batches import data_lengths, run_batch

    targs = cfg.train
    key = repr((cfg.data, cfg.model.model, cfg.method.method, cfg.model.attn_implementation, targs.packing,
                targs.packing_strategy, targs.padding_free, targs.pad_to_multiple_of, targs.seed,
                targs.per_device_train_batch_size))
    if key not in _BATCHES:
        try:
            _BATCHES[key] = run_batch(cfg, data_lengths(cfg)[0]), None
        except UserError as exc:
            _BATCHES[key] = None, str(exc)
    return _BATCHES[key]


def _speed(device_name: str, config: dict, threads, calibration, folder, calibrated_only: bool):
    """(Speed, notes) for a record's device; a UserError (its reason) where none may be used."""
    from harness.plan.speeds import calibration_path, device, load_calibration, require_speed
    from harness.plan.timing import speed_from

    found = device(device_name)
    dtype = str(_compute_dtype_named(config, found.kind))
    peak = found.gpu.speed if found.gpu is not None else None
    if calibration is not None:
        measured = device(f"cpu {calibration.device}" if calibration.threads is not None else calibration.device)
        if measured.slug != found.slug:
            raise UserError(f"{NOT_COMPARABLE}: it ran on {device_name}, the calibration is of {calibration.device} "
                            "(another device's speed would not predict it)")
    elif calibrated_only:
        calibration = load_calibration(device_name, folder)
        if calibration is None:
            raise UserError(f"no calibration of {found.name} ({calibration_path(device_name, folder).name}); run "
                            f"python -m harness.plan.calibrate on that device")
    else:
        peak, calibration = require_speed(device_name, option="device", folder=folder)
    threads = threads if isinstance(threads, int) and not isinstance(threads, bool) else None
    notes = []
    if calibration is not None and calibration.threads is not None:
        if threads is None:
            notes.append(f"the run's CPU threads were not recorded (calibrated with {calibration.threads})")
        elif threads != calibration.threads:
            notes.append(f"ran with {threads} CPU threads, calibrated with {calibration.threads} (not scaled)")
    return speed_from(peak, calibration, dtype, found.kind, threads), notes


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


if __name__ == "__main__":
    sys.exit(main())
