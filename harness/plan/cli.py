"""Will it fit, and how long? Planned peak GPU memory and predicted time before anything is downloaded (only a
config.json, or nothing for the recipes' own models).

  python -m harness.plan --model Qwen/Qwen2-7B-Instruct --gpu T4      # every method x rank: fits or not, step time
  python -m harness.plan recipes/qwen2_7b_adalora.py --gpu A100-80    # one recipe: its defaults + any flags, the run
  python -m harness.plan recipes/llama2_7b_lora.py --gpu L4 --usd_per_hour 0.8   # and what the run costs
  python -m harness.plan recipes/llama2_7b_lora.py --r 32 --max_seq_length 2048 --per_device_train_batch_size 2
  python -m harness.plan --model smollm2-135m --ranks 8 --json        # for machines

Any recipe setting can follow (--r, --quantization, --max_seq_length, --optim, ...). Without a recipe
the table uses the 7B recipes' T4 training (batch 1, 512 tokens, checkpointing, paged 8-bit AdamW).
How each part is computed, and how accurate it is: harness/plan/memory.py and docs/will-it-fit.md.

The time needs the GPU's speed: a listed GPU's data sheet, or a calibration file (python -m harness.plan.calibrate);
a size (--gpu 16) has none. No GPU named and none on this machine: this machine's CPU, when a calibration of it
exists. Calibration files are read from results/gpu, or from the folder in FT_COOKBOOK_CALIBRATION_DIR.
A recipe's whole run: its optimizer steps from its data and settings, its evaluations included
(harness/plan/run_time.py says how); a range, the time model's error not yet measured.
"""
from __future__ import annotations

import argparse
import json
import sys

from harness.errors import raise_usage_error, reported_as_one_line
from harness.plan.method_table import build_plans, step_works
from harness.plan.run_time import PER_STEPS, check_price, checked_note, duration_range, usd, usd_range


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.plan [RECIPE]", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.error = raise_usage_error
    parser.add_argument("--gpu", help="a GPU name (T4, L4, A10G, RTX 4090, A100-80, H100, ...) or its memory in GiB; "
                                      "default: this machine's GPU, if any")
    parser.add_argument("--ranks", default="4,8,16,32", help="ranks for the table of every method (no recipe)")
    parser.add_argument("--usd_per_hour", type=check_price, metavar="PRICE",
                        help="the GPU's price per hour in US dollars: the run's cost beside its time")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    parser.add_argument("--published", action="store_true",
                        help="the planner beside the memory figures others published (results/plan_vs_published.md)")
    return parser


def main(argv: list[str] | None = None) -> int:
    with reported_as_one_line("plan"):
        argv = list(sys.argv[1:] if argv is None else argv)
        # A recipe file comes first; a parser positional would also take the value of an unknown flag.
        recipe = argv.pop(0) if argv and not argv[0].startswith("-") else None
        options, settings = _parser().parse_known_args(argv)
        options.recipe = recipe
        # imported here, not at the top: --help and one-line refusals answer without importing torch
        from harness.models.loading import quiet_libraries

        if options.published:
            # imported here, not at the top: --help and one-line refusals answer without importing torch
            from harness.plan.published import table

            with quiet_libraries():
                print(table())
            return 0
        gpu = _gpu(options.gpu)
        with quiet_libraries():
            plans, table, config, cfgs = build_plans(options, settings)
            times = plan_times(options, gpu, cfgs, config, need_work=options.json)
        if options.json:
            print(json.dumps({"gpu": gpu and {"name": gpu[0], "bytes": int(gpu[1] * 2**30)},
                              "time_device": times.device, "usd_per_hour": options.usd_per_hour,
                              "plans": [{**p.to_dict(), **times.fields(i, options.usd_per_hour)}
                                        for i, p in enumerate(plans)]}, indent=1))
        else:
            print(_table(plans, gpu, config.hidden_size, times, options.usd_per_hour) if table
                  else _breakdown(plans[0], gpu, times, options.usd_per_hour))
    return 0


def _gpu(spec: str | None):
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    from harness.plan.gpus import gpu_memory

    if spec is not None:
        return gpu_memory(spec)
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory / 2**30
    return None


class PlanTimes:
    """The time of each plan's step on the device the time is planned for, and a recipe's whole run; where no
    speed is known, the reason (time_reason) instead."""

    def __init__(self, device=None, reason=None, works=None, estimates=None, runs=None, left_out="",
                 time_works=None):
        self.device, self.reason, self.works, self.estimates, self.runs = device, reason, works, estimates, runs
        self.left_out = left_out  # what the time does not count (harness.plan.run_time.left_out)
        # The work the time was computed from, where it is not the plan's (this CPU's float32 run of a 16-bit plan).
        self.time_works = time_works or works
        # A recipe's run at its rows' real lengths: (RunTime, harness.plan.batches.MeanBatch), or why not (str)
        self.from_data = None

    def fields(self, i: int, usd_per_hour: float | None) -> dict:
        out = dict(self.works[i].to_dict()) if self.works else {}
        if self.time_works and self.works and self.time_works[i] is not self.works[i]:
            out["time_step_work"] = self.time_works[i].to_dict()  # the step timed: this device's dtype's
        if self.estimates:
            out.update(self.estimates[i].to_dict())
        else:
            out.update(step_seconds=None, tokens_per_second=None, time_reason=self.reason)
        if self.runs:
            out.update(self.runs[i].to_dict())
        if self.left_out:
            out["time_left_out"] = self.left_out
        if isinstance(self.from_data, tuple):
            run, batch = self.from_data
            out["from_data"] = {**run.to_dict(), "batch": batch.to_dict()}
        elif self.from_data:
            out["from_data"] = {"reason": self.from_data}
        if usd_per_hour is not None:
            cost = self.cost(i, usd_per_hour)
            out["usd"] = cost and {"low": cost[0], "high": cost[1], "for": cost[2]}
            if cost is None:
                out["usd_reason"] = f"the time is not known: {self.reason}"
        return out

    def cost(self, i: int, usd_per_hour: float):
        """(low, high, what for) in US dollars: the run's, where its steps are known, else 1,000 steps'."""
        if not self.estimates:
            return None
        run = self.runs[i] if self.runs else None
        if run is not None and run.seconds is not None:
            return (*usd(run.low, run.high, usd_per_hour), "the run")
        step = self.estimates[i]
        return (*usd(step.low * PER_STEPS, step.high * PER_STEPS, usd_per_hour), f"{PER_STEPS:,} optimizer steps")


def plan_times(options, gpu, cfgs, config, need_work: bool) -> PlanTimes:
    """PlanTimes of every plan: on the GPU named (--gpu), else this machine's GPU, else this machine's CPU (from its
    calibration). need_work: count each step's work even where no speed is known (--json carries it)."""
    # imported here, not at the top: --help and one-line refusals answer without importing torch
    import torch

    from harness.errors import UserError
    from harness.plan.method_table import compute_dtype
    from harness.plan.run_time import device_speed, left_out, rows_of, run_length, run_time
    from harness.plan.timing import step_seconds
    from harness.plan.work import step_work

    if options.gpu is not None or gpu:
        spec, kind = (options.gpu if options.gpu is not None else gpu[0]), "cuda"
        name = gpu[0] if gpu else spec
    else:
        spec, kind, name = "cpu", "cpu", "this machine's CPU"
    # This machine's CPU trains in float32 under --dtype auto (harness.models.loading); a GPU in the plan's dtype.
    dtypes = [torch.float32 if kind == "cpu" and cfg.model.dtype == "auto" else compute_dtype(cfg) for cfg in cfgs]
    try:
        speeds = [device_speed(spec, kind, str(d).removeprefix("torch."),
                               threads=torch.get_num_threads() if kind == "cpu" else None) for d in dtypes]
    except UserError as exc:
        reason = (f"no GPU named and none on this machine, and {exc}" if kind == "cpu" else str(exc))
        return PlanTimes(None, reason, step_works(cfgs, config) if need_work else None)
    plan_works = step_works(cfgs, config) if need_work or kind == "cuda" else None
    # The step's work in the dtype the device trains in: the plan's own count where that is the plan's dtype.
    works = [plan_works[i] if plan_works and d == compute_dtype(cfg) else step_work(cfg, config, compute_dtype=d)
             for i, (cfg, d) in enumerate(zip(cfgs, dtypes))]
    estimates = [step_seconds(w, s, micro_batches=cfg.train.gradient_accumulation_steps)
                 for w, s, cfg in zip(works, speeds, cfgs)]
    device = {"name": name, "kind": kind, "speed_source": speeds[0].source,
              "compute_dtype": str(dtypes[0]).removeprefix("torch.")}
    if not options.recipe:
        return PlanTimes(device, None, plan_works, estimates, time_works=works)
    [cfg], [work], [estimate] = cfgs, works, estimates
    try:
        train_rows, eval_rows, rows_from = rows_of(cfg)
    except UserError as exc:  # the plan still stands; the run's length is what is not known
        train_rows, eval_rows, rows_from = None, 0, f"its data could not be read: {exc}"
    length = run_length(cfg.train, train_rows, eval_rows, eval_max_samples=cfg.data.eval_max_samples,
                        rows_from=rows_from)
    times = PlanTimes(device, None, plan_works, estimates, [run_time(estimate, work, length, cfg.train)], left_out(cfg),
                      works)
    if cfg.run.objective == "sft" and train_rows:
        times.from_data = _time_of_data(cfg, config, dtypes[0], speeds[0])
    return times


def _time_of_data(cfg, config, dtype, speed):
    """(RunTime, MeanBatch) of an SFT recipe at its rows' real lengths, where its data and tokenizer are here
    (harness.plan.batches), else the reason (str) they are not."""
    from harness.errors import UserError
    from harness.models.loading import quiet_libraries
    from harness.plan.batches import data_lengths, run_batch
    from harness.plan.run_time import estimate_run

    try:
        with quiet_libraries():
            lengths, eval_rows = data_lengths(cfg)
    except UserError as exc:
        return str(exc)
    batch = run_batch(cfg, lengths)
    rows_from = f"{len(lengths):,} examples of {sum(lengths) / len(lengths):,.0f} tokens on average, {batch.note}"
    return estimate_run(cfg, config, dtype, speed, batch.train_rows, eval_rows, rows_from, batch)[1], batch


def _step_range(estimate) -> str:
    return f"{estimate.low:.3g}-{estimate.high:.3g}"


def _tokens_range(estimate) -> str:
    tokens = estimate.tokens_per_second * estimate.seconds  # of one step
    return f"{tokens / estimate.high:,.0f}-{tokens / estimate.low:,.0f}"


def _time_note(times: PlanTimes) -> str:
    if not times.estimates:
        return f"Time: not known ({times.reason}).\n\n"
    from harness.plan.timing import RANGE_FACTOR

    device = times.device
    return (f"Time on {device['name']}, {device['compute_dtype']} ({checked_note()}): each a range, the estimate divided and multiplied by "
            f"{RANGE_FACTOR:g}; speed: {device['speed_source']}. How: harness/plan/timing.py.\n\n")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _table(plans, gpu, hidden_size: int, times: PlanTimes, usd_per_hour: float | None) -> str:
    from tabulate import tabulate

    gpu_bytes = gpu[1] * 2**30 if gpu else None
    rows = []
    for i, p in enumerate(plans):
        row = {
            "method": p.label, "rank": p.rank if p.rank is not None else "",
            "trainable (M)": f"{p.trainable_params / 1e6:.2f}",
            "weights": _gib(p.bytes_of("weights", *(["trainable parameters"] if p.method == "full" else []))),
            "grads + optimizer": _gib(p.bytes_of("gradients", "optimizer states", "AdaLoRA importance scores")),
            "activations": _gib(p.bytes_of("activations saved for backward")),
            "planned peak (GiB)": _gib(p.total_bytes),
        }
        if gpu_bytes:
            row[f"fits {gpu[0]}"] = "yes" if p.fits(gpu_bytes) else "no"
            row["largest batch"] = p.max_batch_size(gpu_bytes)
            longest = p.max_seq_length(gpu_bytes)
            row["longest sequence"] = longest if longest is not None else ""
        if times.estimates:
            estimate = times.estimates[i]
            row["step (s)"], row["tokens/s"] = _step_range(estimate), _tokens_range(estimate)
            if usd_per_hour is not None:
                low, high, _ = times.cost(i, usd_per_hour)
                row[f"$ per {PER_STEPS:,} steps"] = usd_range(low, high)
        rows.append(row)
    first = plans[0]
    head = (f"Planned peak GPU memory of {first.model}: {first.seq_length} tokens, batch {first.batch_size}, "
            f"{first.optim}, checkpointing {'on' if first.checkpointing else 'off'}, {first.compute_dtype} compute"
            + (f", on {gpu[0]} ({gpu[1]:.1f} GiB)" if gpu else "") + ".\n\n")
    ranks = _largest_ranks(plans, gpu_bytes, hidden_size) if gpu_bytes else ""
    price = "" if usd_per_hour is None or times.estimates else "Cost: not known (the time is not known).\n\n"
    return (head + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n\n" + ranks
            + _time_note(times) + price + _legend())


def _largest_ranks(plans, gpu_bytes: float, hidden_size: int) -> str:
    """The largest rank of each ranked method that fits, at the table's batch and length: every byte a rank
    adds (adapter, its gradients and optimizer state, its activations) grows linearly with it, so the
    line through the smallest and largest planned rank gives it. A rank above the hidden size adds nothing
    (an update of a hidden x hidden matrix has at most that rank), so the search stops there."""
    by_method: dict[str, list] = {}
    for p in plans:
        if p.rank is not None:
            by_method.setdefault(p.label, []).append(p)
    found = []
    for label, group in by_method.items():
        low, high = min(group, key=lambda p: p.rank), max(group, key=lambda p: p.rank)
        if high.rank == low.rank or high.total_bytes <= low.total_bytes:
            continue
        per_rank = (high.total_bytes - low.total_bytes) / (high.rank - low.rank)
        largest = int(low.rank + (gpu_bytes - low.total_bytes) // per_rank)
        found.append(f"{label}: none" if largest < 1 else f"{label} {largest:,}" if largest < hidden_size
                     else f"{label} any (up to the hidden size, {hidden_size:,})")
    return f"Largest rank that fits: {'; '.join(found)}.\n\n" if found else ""


def _breakdown(p, gpu, times: PlanTimes, usd_per_hour: float | None) -> str:
    from tabulate import tabulate

    rows = [{"part": part.name, "GiB": _gib(part.bytes), "how": part.how} for part in p.parts if part.bytes]
    rows.append({"part": "planned peak", "GiB": _gib(p.total_bytes), "how": ""})
    rank = f" rank {p.rank}" if p.rank is not None else ""
    head = (f"{p.model}, {p.method}{rank}, quantization {p.quantization}: {p.trainable_params / 1e6:.2f} M trainable of "
            f"{p.total_params / 1e6:.0f} M; {p.seq_length} tokens, batch {p.batch_size}, {p.optim}, "
            f"checkpointing {'on' if p.checkpointing else 'off'}, {p.compute_dtype} compute.\n\n")
    text = head + tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) + "\n"
    if gpu:
        gpu_bytes = gpu[1] * 2**30
        margin = (gpu_bytes - p.total_bytes) / 2**30
        verdict = f"fits, {margin:.2f} GiB to spare" if margin >= 0 else f"does not fit: {-margin:.2f} GiB over"
        longest = p.max_seq_length(gpu_bytes)
        text += (f"\n{gpu[0]} ({gpu[1]:.1f} GiB): {verdict}; the largest batch that fits at {p.seq_length} tokens: "
                 f"{p.max_batch_size(gpu_bytes)}" + (f"; the longest sequence at batch {p.batch_size}: {longest:,} tokens"
                                                     if longest is not None else "") + ".\n")
    return text + "\n" + _run_text(times, usd_per_hour) + _legend()


def _run_text(times: PlanTimes, usd_per_hour: float | None) -> str:
    """A recipe's time: one step, the whole run (or 1,000 steps where its steps are not known), its cost."""
    price = f"${usd_per_hour:g}/h" if usd_per_hour is not None else ""
    if not times.estimates:
        return (f"Time: not known ({times.reason})."
                + (f" Cost at {price}: not known without the time." if price else "") + "\n\n")
    step, run = times.estimates[0], times.runs[0]
    length = run.length
    notes = "; ".join(filter(None, [checked_note(), times.left_out]))
    text = (f"Time on {times.device['name']}, {times.device['compute_dtype']} ({notes}): {_step_range(step)} s per "
            "optimizer step, "
            f"{_tokens_range(step)} training tokens/s. ")
    if run.seconds is None:
        thousand = duration_range(step.low * PER_STEPS, step.high * PER_STEPS)
        text += f"The run's steps are not known ({length.rows_from}): {thousand} per {PER_STEPS:,} optimizer steps"
    else:
        epochs = f"; {length.steps_per_epoch:,} per epoch" if length.steps_per_epoch else ""
        each = duration_range(run.eval_pass_seconds * step.low / step.seconds,
                              run.eval_pass_seconds * step.high / step.seconds)
        passes = f"{length.eval_passes} evaluation{'s' if length.eval_passes > 1 else ''}"
        evaluation = (f" + {passes} of {length.eval_rows:,} rows, forward only ({each} each)"
                      if length.eval_passes else " (no evaluation)")
        text += (f"The run: {length.steps:,} optimizer steps ({length.rows_from or 'max_steps'}{epochs})"
                 f"{evaluation} = {duration_range(run.low, run.high)}, at most: every row counted at the full "
                 "--max_seq_length (shorter rows train faster)")
        if isinstance(times.from_data, tuple):
            real, batch = times.from_data
            text += (f". At its rows' real lengths ({real.length.rows_from}: {batch.positions / batch.rows:,.0f} "
                     f"positions a row): {real.length.steps:,} optimizer steps = "
                     f"{duration_range(real.low, real.high)}")
        elif times.from_data:
            text += f" (its rows' real lengths are not known: {times.from_data})"
    if price:
        low, high, what = times.cost(0, usd_per_hour)
        text += f"; at {price}: {usd_range(low, high)} for {what}"
    return text + f".\nSpeed: {times.device['speed_source']}. How: harness/plan/run_time.py.\n\n"


def _legend() -> str:
    return ("counted: from the model's tensors, built on the meta device with the run's real PEFT config; "
            "formula: bitsandbytes' storage formats; modelled: fused attention, transient buffers, CUDA context "
            "(not yet checked against a GPU).")


if __name__ == "__main__":
    sys.exit(main())
