"""How long a whole run takes, and what it costs: its optimizer steps and evaluation passes (from its data and
settings) times the time of one step on a device (harness.plan.timing), as a range.

    steps          = max_steps when set, else epochs x ceil(ceil(training rows / (batch x processes)) / accumulation)
                     (the Trainer's own arithmetic: harness.models.methods.count_optimizer_steps)
    evaluations    = what --eval_strategy asks (every eval_steps steps, or each epoch), one before training with
                     --eval_on_start, and the recipes' final evaluation when the last step did not evaluate
    one evaluation = ceil(eval rows / (eval batch x processes)) forward-only passes of an eval batch
    run            = steps x step seconds + evaluations x evaluation seconds

A forward-only pass is priced as the training step's share of it: an eval batch of b rows takes
(step seconds / accumulation) x (b / train batch) x forward share, where the forward share is the step's forward
FLOPs over all its FLOPs (forward + backward + checkpointing's recompute + DPO's reference; harness.plan.work
counts each). It carries the step's bytes and overheads in the same share, which an evaluation (no optimizer,
no gradients) has less of: an estimate of the evaluation, not a count.

The range is the step's (harness.plan.timing.Estimate.low/high), applied to the whole run; the cost is the range
in hours times the price per hour. Where the rows cannot be known without downloading (a Hub dataset), the
steps are not known: the time of 1,000 steps is given instead.

Calibration files are read from results/gpu, or from the folder in FT_COOKBOOK_CALIBRATION_DIR when it is set
(a calibration made elsewhere, or a test's own).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from harness.errors import UserError

PER_STEPS = 1000  # "time per 1,000 steps" where the run's steps are not known


def checked_note() -> str:
    """What every printed time says beside it: an estimate, and where its accuracy is shown
    (harness.plan.timing.TIME_MODEL_CHECKED)."""
    from harness.plan.timing import TIME_MODEL_CHECKED

    if TIME_MODEL_CHECKED.startswith("no"):
        return "estimate, not yet checked"
    return "estimate; how close: results/time_check.md, results/time_vs_published.md"


def left_out(cfg) -> str:
    """What the time leaves out of this run, said beside it ("" when nothing the run spends much on)."""
    if cfg.run.objective == "grpo":  # harness.plan.work counts the training step, not the completions it samples
        return "GRPO's generation of completions not counted: the run takes longer"
    return ""


@dataclass(frozen=True)
class RunLength:
    """How much a run does, from its data and settings."""

    steps: int | None  # optimizer steps; None when the training rows are not known
    steps_per_epoch: int | None
    train_rows: int | None
    eval_rows: int  # rows scored at each evaluation (after --eval_max_samples)
    eval_passes: int  # evaluations over the run
    rows_from: str  # where the rows were counted, or why they are not known


def optimizer_steps(train_rows: int, batch: int, accumulation: int, processes: int, epochs: float,
                    max_steps: int) -> tuple[int, int]:
    """(optimizer steps of the run, optimizer steps per epoch), as the Trainer counts them."""
    # imported here, not at the top: the planner's one-line refusals answer without importing torch
    from harness.models.methods import count_optimizer_steps

    per_epoch = count_optimizer_steps(train_rows, batch * processes, accumulation, 1, 0)
    return count_optimizer_steps(train_rows, batch * processes, accumulation, epochs, max_steps), per_epoch


def evaluation_passes(steps: int, steps_per_epoch: int, strategy: str, eval_steps: float | None,
                      logging_steps: float | None, eval_on_start: bool) -> int:
    """Evaluations over a run of `steps` optimizer steps that has rows to evaluate: the Trainer's during
    training (every eval_steps steps, a fraction of the run when under 1, logging_steps when unset; or at each
    epoch's end), one before training with eval_on_start, and the recipes' final one when the last step did not
    evaluate (harness.objectives.sft: a final evaluation reuses the last step's, else runs)."""
    strategy = str(getattr(strategy, "value", strategy))
    during, last_evaluated = 0, False
    if strategy == "steps":
        every = eval_steps if eval_steps else logging_steps
        if every and every < 1:  # a fraction of the run, as TrainingArguments reads it
            every = math.ceil(steps * every)
        every = int(every or 0)
        if every >= 1:
            during, last_evaluated = steps // every, steps % every == 0
    elif strategy == "epoch":
        during, last_evaluated = math.ceil(steps / max(steps_per_epoch, 1)), True  # the last epoch ends the run
    return during + int(bool(eval_on_start)) + int(not last_evaluated)


def run_length(targs, train_rows: int | None, eval_rows: int, processes: int = 1, eval_max_samples: int | None = None,
               rows_from: str = "") -> RunLength:
    """The RunLength of a run with these TrainingArguments (targs) on this many rows."""
    scored = min(eval_rows, eval_max_samples) if eval_max_samples else eval_rows
    if train_rows is None:
        if targs.max_steps and targs.max_steps > 0:  # the steps are known without the rows; epochs are not
            steps, per_epoch = targs.max_steps, None
        else:
            return RunLength(None, None, None, scored, 0, rows_from)
    else:
        steps, per_epoch = optimizer_steps(train_rows, targs.per_device_train_batch_size,
                                           targs.gradient_accumulation_steps, processes, targs.num_train_epochs,
                                           targs.max_steps)
    passes = evaluation_passes(steps, per_epoch or steps, targs.eval_strategy, targs.eval_steps,
                               targs.logging_steps, targs.eval_on_start) if scored else 0
    return RunLength(steps, per_epoch, train_rows, scored, passes, rows_from)


def forward_share(work) -> float:
    """Of one training step's FLOPs (harness.plan.work.StepWork), the share of its forward pass."""
    return work.forward_flops / work.flops if work.flops > 0 else 1 / 3


def eval_pass_seconds(step_seconds: float, work, eval_rows: int, eval_batch: int, train_batch: int,
                      accumulation: int, processes: int = 1) -> float:
    """Seconds of one evaluation over eval_rows rows (see the module's docstring)."""
    if eval_rows <= 0:
        return 0.0
    batches = math.ceil(eval_rows / (eval_batch * processes))
    return batches * step_seconds / accumulation * (eval_batch / train_batch) * forward_share(work)


@dataclass(frozen=True)
class RunTime:
    length: RunLength
    step: object  # harness.plan.timing.Estimate
    train_seconds: float | None  # at the estimate; None when the steps are not known
    eval_pass_seconds: float
    seconds: float | None
    low: float | None
    high: float | None

    def to_dict(self) -> dict:
        length = self.length
        return {"steps": length.steps, "steps_per_epoch": length.steps_per_epoch, "train_rows": length.train_rows,
                "eval_rows": length.eval_rows, "eval_passes": length.eval_passes, "rows_from": length.rows_from,
                "eval_pass_seconds": self.eval_pass_seconds, "train_seconds": self.train_seconds,
                "run_seconds": None if self.seconds is None else
                {"estimate": self.seconds, "low": self.low, "high": self.high},
                "seconds_per_1000_steps": {"low": self.step.low * PER_STEPS, "high": self.step.high * PER_STEPS}}


def run_time(step, work, length: RunLength, targs, processes: int = 1) -> RunTime:
    """The whole run's time from one step's Estimate (`step`) and its StepWork (`work`)."""
    evaluation = eval_pass_seconds(step.seconds, work, length.eval_rows, targs.per_device_eval_batch_size,
                                   targs.per_device_train_batch_size, targs.gradient_accumulation_steps, processes)
    if length.steps is None:
        return RunTime(length, step, None, evaluation, None, None, None)
    train = length.steps * step.seconds
    seconds = train + length.eval_passes * evaluation
    # The step's range is a factor either way (harness.plan.timing.RANGE_FACTOR); the run's is the same factor.
    return RunTime(length, step, train, evaluation, seconds, seconds * step.low / step.seconds,
                   seconds * step.high / step.seconds)


def estimate_run(cfg, config, dtype, speed, train_rows: int | None, eval_rows: int, rows_from: str, batch=None,
                 processes: int = 1):
    """(the step's harness.plan.timing.Estimate, the whole run's RunTime) of the run cfg at `speed`: its step's
    work counted at its window, or at its data's average micro-batch (batch: harness.plan.batches.MeanBatch)."""
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.plan.timing import step_seconds
    from harness.plan.work import step_work

    targs = cfg.train
    work = step_work(cfg, config, compute_dtype=dtype, batch=batch)
    step = step_seconds(work, speed, micro_batches=targs.gradient_accumulation_steps)
    length = run_length(targs, train_rows, eval_rows, processes, cfg.data.eval_max_samples, rows_from)
    return step, run_time(step, work, length, targs, processes)


def usd(low_seconds: float, high_seconds: float, usd_per_hour: float) -> tuple[float, float]:
    return low_seconds / 3600 * usd_per_hour, high_seconds / 3600 * usd_per_hour


def duration_range(low: float, high: float) -> str:
    """'12-19 min': both ends in the unit that suits the longer."""
    for unit, size in (("h", 3600), ("min", 60)):
        if high >= 1.5 * size:
            return f"{_figure(low / size)}-{_figure(high / size)} {unit}"
    return f"{_figure(low)}-{_figure(high)} s"


def _figure(value: float) -> str:
    return f"{value:.2g}" if value < 10 else f"{value:,.0f}"


def usd_range(low: float, high: float) -> str:
    return f"${low:.2g}-${high:.2g}" if high < 1 else f"${low:,.2f}-${high:,.2f}"


def check_price(text: str) -> float:
    """--usd_per_hour's value: a finite price, zero or more (argparse's type)."""
    import argparse

    try:
        price = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass the price per hour in US dollars, "
                                         "e.g. --usd_per_hour 0.8") from None
    if not math.isfinite(price) or price < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a price; pass zero or more US dollars per hour, "
                                         "e.g. --usd_per_hour 0.8")
    return price


def device_speed(spec: str, kind: str, dtype: str, folder: Path | None = None, threads: int | None = None):
    """The harness.plan.timing.Speed of a device: spec a GPU's name (kind "cuda") or "cpu" (this machine's CPU,
    from its calibration file alone), its calibration read from `folder` (default: harness.plan.speeds.
    calibration_dir). Raises UserError saying why where none is known."""
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.plan.speeds import CALIBRATE_COMMAND, calibration_path, load_calibration, require_speed
    from harness.plan.timing import speed_from

    if kind == "cpu":
        calibration = load_calibration("cpu", folder)
        if calibration is None:
            raise UserError(f"no calibration of this machine's CPU ({calibration_path('cpu', folder)} not found): "
                            f"run {CALIBRATE_COMMAND} to time it, or name a GPU with --gpu")
        return speed_from(None, calibration, dtype, "cpu", threads)
    peak, calibration = require_speed(spec, folder=folder)
    return speed_from(peak, calibration, dtype, "cuda")


def rows_of(cfg) -> tuple[int | None, int, str]:
    """(training rows, held-out rows, where they were counted) of a run's data, read as the recipe reads them
    (harness.data.reading: --max_samples, --validation_split or --eval_file, rows without text left out),
    without downloading: a Hub dataset's rows are None, with the reason."""
    import contextlib
    import io

    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.data import reading

    data = cfg.data
    if data.dataset_name and not Path(data.dataset_name).exists():
        return None, 0, f"Hub dataset {data.dataset_name}: its size is not known without downloading it"
    with contextlib.redirect_stdout(io.StringIO()):  # the reader's own notes are for a run, not for a plan
        loaded, held_out = reading.load_records(data), reading.load_eval_records(data)
        train, evaluation = reading.split_records(loaded.rows, data, held_out)
    source = data.dataset_name or data.data_file
    how = (f"{len(train):,} training rows of {source}"
           + (f" (--max_samples {data.max_samples})" if data.max_samples else "")
           + (f", {len(evaluation):,} held out by --validation_split {data.validation_split:g}"
              if evaluation and not data.eval_file else f", {len(evaluation):,} of {data.eval_file}" if evaluation
              else ""))
    return len(train), len(evaluation), how
