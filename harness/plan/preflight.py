"""The memory plan a recipe prints before it loads the model, and its stop when the plan does not fit.

Checked against the GPU's free memory (and --memory_budget_gb when smaller) on a GPU, against
--memory_budget_gb alone on CPU (the plan is then for this machine's fp32 run), not at all otherwise.
--memory_check false prints the plan and runs anyway: the plan is an estimate (docs/will-it-fit.md).

The same line carries the run's predicted time (harness.plan.run_time) where a speed is known for the device it
runs on: the GPU's data sheet or calibration, or this machine's CPU's calibration, every row counted at the
window ("at most"); an SFT run says its time again once its data are tokenized, at the rows' real lengths
(time_from_data, harness.plan.batches). The time is advice: any failure to estimate it leaves it out of the
line, never stops the run.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from harness.errors import UserError
from harness.models.loading import compute_dtype, quiet_libraries
from harness.models.methods import LORA_FAMILY, check_method
from harness.plan.architectures import model_config
from harness.plan.memory import CUDA_CONTEXT_BYTES, plan_run
from harness.plan.speeds import calibrated_memory
from harness.run.distributed import batch_factor, strategy
from harness.run.measure import command_line

GIB = 2**30


@dataclasses.dataclass
class Budget:
    bytes: float  # what the run may use beside the CUDA context
    where: str  # "Tesla T4 has 14.58 GiB free" or "--memory_budget_gb is 4 GiB"
    kind: str  # recorded: cuda_free | memory_budget


def check_memory_plan(cfg, targs, workload=None) -> dict[str, Any]:
    """Print the run's planned peak memory (and predicted time); stop with one line when it does not fit. Returns
    the record for result.json ("memory_plan"). workload: the preflight's Workload (its rows give the run's
    steps); without it the time is given per 1,000 steps."""
    import torch

    cuda = torch.cuda.is_available()
    cfg = dataclasses.replace(cfg, train=targs)
    # this GPU's calibration's context and allocator reserve where there is one (harness.plan.speeds)
    measured = calibrated_memory(torch.cuda.get_device_name()) if cuda else {}
    context = measured.get("context_bytes", CUDA_CONTEXT_BYTES) if cuda else 0
    try:
        with quiet_libraries():
            config, plan = _plan(cfg, compute_dtype(cfg.model.dtype), {**measured, "context_bytes": context})
    except Exception as exc:  # noqa: BLE001 - a plan is advice: a model it cannot plan still trains
        reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        print(f"Memory plan: not made ({reason.splitlines()[0][:300]}); the run goes on unchecked.")
        return {"status": "not_made", "reason": reason[:500]}
    budget = _budget(cfg, cuda)

    unsloth = cfg.model.backend == "unsloth"
    sharded = strategy() == "fsdp"  # each GPU holds a shard: the plan (one whole copy) is an upper bound
    needed = plan.total_bytes - context  # the budget is what is left beside the context
    record = {
        "status": "planned", "planned_peak_mb": round(plan.total_bytes / 2**20, 1),
        "cuda_context_mb": round(context / 2**20, 1), "compute_dtype": plan.compute_dtype,
        "trainable_params": plan.trainable_params,
        "parts_mb": {part.name: round(part.bytes / 2**20, 1) for part in plan.parts},
    }
    note = (" (Unsloth: an estimate, its own kernels save less)" if unsloth
            else " (one whole copy: under FSDP each GPU holds less)" if sharded else "")
    try:
        with quiet_libraries():
            timed, record["time_plan"] = planned_time(cfg, config, compute_dtype(cfg.model.dtype), cuda, workload)
    except Exception:  # noqa: BLE001 - the time is advice: a run it cannot estimate still trains
        timed = ""
    print(f"Memory plan: {_summary(plan, context)}{note}"
          + (f"; {budget.where}: {'fits' if needed <= budget.bytes else 'does not fit'}" if budget else "")
          + f"{timed}. Breakdown: {_plan_command(cfg)}")
    if budget is None:
        return record
    record.update(checked_against=budget.kind, available_mb=round(budget.bytes / 2**20, 1))
    if needed <= budget.bytes or unsloth or sharded or not cfg.run.memory_check:
        return record
    with quiet_libraries():
        fixes = what_would_fit(cfg, config, plan, budget.bytes + context, context, measured)
    raise UserError(
        f"the memory plan says this run needs {_size(needed)} but {budget.where}: {_size(needed - budget.bytes)} short. "
        + (f"Would fit: {'; or '.join(fixes)}. " if fixes else
           "Neither a smaller batch, checkpointing, 4-bit nor a lower rank fits: use a bigger GPU or a smaller model. ")
        + "--memory_check false runs it anyway (the plan is an estimate)"
    )


def _plan(cfg, dtype, memory: dict):
    config = model_config(cfg.model.model, cfg.model.trust_remote_code)
    return config, plan_run(cfg, config, compute_dtype=dtype, **memory)


def planned_time(cfg, config, dtype, cuda: bool, workload=None) -> tuple[str, dict[str, Any]]:
    """(the plan line's time part, its record) of the run cfg (its train settings the run's) on this machine's
    GPU (cuda) or CPU: "; predicted 12-19 min on NVIDIA H200 (...)", or "; time: not known (...)" where no speed
    is known for the device."""
    from harness.plan import run_time as whole_run

    try:
        speed, where = _speed(dtype, cuda)
    except UserError as exc:
        short = (f"no speed known for {_device_name(cuda)}" if cuda
                 else "no calibration of this CPU: python -m harness.plan.calibrate")
        return f"; time: not known ({short})", {"status": "not_known", "reason": str(exc)[:500]}
    train_rows, eval_rows = (len(workload.train_rows), len(workload.eval_rows)) if workload else (None, 0)
    step, run = whole_run.estimate_run(cfg, config, dtype, speed, train_rows, eval_rows,
                                       "the run's data" if workload else "", processes=batch_factor())
    record = {"status": "planned", "device": where, **run.to_dict(), "step_seconds": step.to_dict(),
              "left_out": whole_run.left_out(cfg) or None}
    if run.seconds is None:
        thousand = whole_run.PER_STEPS
        what = (f"{whole_run.duration_range(step.low * thousand, step.high * thousand)} per {thousand:,} "
                "optimizer steps")
    else:
        # Planned at max_seq_length, as the memory plan is: a data set of shorter rows trains faster (padding-free
        # rows cost their real tokens; padded ones the batch's longest), so this is the most the run should take;
        # an SFT run says how long its real rows take once they are tokenized (time_from_data).
        what = (f"at most {whole_run.duration_range(run.low, run.high)} ({_steps(run)}, "
                f"every row at {cfg.data.max_seq_length:,} tokens)")
    return f"; predicted {what} on {where} ({_notes(cfg)})", record


def time_from_data(cfg, targs, prepared, plan_record: dict) -> None:
    """Once an SFT run's data are tokenized (`prepared`: harness.data.encoding.PreparedData), its time from the rows'
    real lengths, batched as the run batches them (harness.plan.batches: padded to each batch's longest,
    padding-free or packed): one line, and the record's time_plan["from_data"]. Advice, as the plan line's time:
    any failure to estimate it leaves it out."""
    time_plan = plan_record.get("time_plan") or {}
    if cfg.run.objective != "sft" or time_plan.get("status") != "planned":
        return
    try:
        with quiet_libraries():
            line, record = _time_of_lengths(dataclasses.replace(cfg, train=targs),
                                            [len(r) for r in prepared.train["input_ids"]],
                                            len(prepared.eval) if prepared.eval is not None else 0)
    except Exception:  # noqa: BLE001 - the time is advice: a run it cannot estimate still trains
        return
    print(line)
    time_plan["from_data"] = record


def _time_of_lengths(cfg, lengths: list[int], eval_rows: int) -> tuple[str, dict[str, Any]]:
    import torch

    from harness.plan import run_time as whole_run
    from harness.plan.batches import run_batch

    dtype = compute_dtype(cfg.model.dtype)
    speed, where = _speed(dtype, torch.cuda.is_available())
    batch = run_batch(cfg, lengths)
    config = model_config(cfg.model.model, cfg.model.trust_remote_code)
    step, run = whole_run.estimate_run(cfg, config, dtype, speed, batch.train_rows, eval_rows,
                                       "the run's tokenized data", batch, processes=batch_factor())
    record = {"status": "planned", "device": where, **run.to_dict(), "step_seconds": step.to_dict(),
              "batch": batch.to_dict(), "mean_example_tokens": sum(lengths) / len(lengths)}
    rows = (f"{len(lengths):,} examples of {sum(lengths) / len(lengths):,.0f} tokens on average, "
            f"{batch.note}: {batch.positions / batch.rows:,.0f} positions a row")
    return (f"Time from the data's tokens: predicted {whole_run.duration_range(run.low, run.high)} ({_steps(run)}; "
            f"{rows}) on {where} ({_notes(cfg)})"), record


def _speed(dtype, cuda: bool):
    """(harness.plan.timing.Speed, the device in words) of this machine's GPU (cuda) or CPU; UserError where no
    speed is known."""
    import torch

    from harness.plan import run_time as whole_run

    name, kind = (_device_name(cuda), "cuda") if cuda else ("cpu", "cpu")
    speed = whole_run.device_speed(name, kind, str(dtype).removeprefix("torch."),
                                   threads=torch.get_num_threads() if kind == "cpu" else None)
    return speed, ("this machine's CPU" if kind == "cpu" else name)


def _device_name(cuda: bool) -> str:
    import torch

    return torch.cuda.get_device_name() if cuda else "cpu"


def _steps(run) -> str:
    n = run.length.eval_passes
    return f"{run.length.steps:,} steps" + (f", {n} evaluation{'s' if n > 1 else ''}" if n else "")


def _notes(cfg) -> str:
    from harness.plan import run_time as whole_run

    return "; ".join(filter(None, [whole_run.checked_note(), whole_run.left_out(cfg)]))


def _budget(cfg, cuda: bool) -> Budget | None:
    import torch

    limit = cfg.run.memory_budget_gb
    budget = Budget(limit * GIB, f"--memory_budget_gb is {limit:g} GiB", "memory_budget") if limit else None
    if cuda:
        free, _ = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name()
        if budget is None or free < budget.bytes:
            budget = Budget(free, f"{name} has {_size(free)} free", "cuda_free")
    return budget


def _summary(plan, context: int) -> str:
    training = plan.bytes_of("trainable parameters", "gradients", "optimizer states", "AdaLoRA importance scores")
    transient = sum(part.bytes for part in plan.parts if "transient" in part.name or "autocast" in part.name)
    pieces = [f"weights {_size(plan.bytes_of('weights'))}", f"trainable + gradients + optimizer {_size(training)}",
              f"activations {_size(plan.bytes_of('activations saved for backward'))}",
              f"transient {_size(transient)}"] + ([f"CUDA context {_size(context)}"] if context else [])
    reserve = sum(part.bytes for part in plan.parts if part.name.startswith("allocator reserve"))
    pieces += [f"allocator reserve {_size(reserve)} (measured)"] if reserve else []
    return (f"planned peak {_size(plan.total_bytes)} ({', '.join(pieces)}; {plan.compute_dtype}, "
            f"batch {plan.batch_size} x {plan.seq_length} tokens)")


def _plan_command(cfg) -> str:
    """The harness.plan command for this run's breakdown (its own flags; a recipe script when there is one)."""
    command = command_line(cfg.run.recipe, cfg.argv)
    if command.startswith("python recipes/"):
        return command.replace("python ", "python -m harness.plan ", 1)
    return "python -m harness.plan with this recipe and its flags"


def _size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 2 else f"{n / 2**20:.1f} MiB"


def what_would_fit(cfg, config, plan, capacity: float, context: int, memory: dict | None = None) -> list[str]:
    """The changes, each alone, after which the plan fits in capacity bytes (context included): a smaller
    batch (the same effective batch through accumulation), checkpointing, a 4-bit base, a lower rank. memory:
    plan_run's calibrated allocator reserve, where the plan has one."""
    targs, method = cfg.train, cfg.method
    fixes = []
    largest, batch_now = plan.max_batch_size(capacity), targs.per_device_train_batch_size
    if 1 <= largest < batch_now:
        # The largest batch that fits and divides the current one keeps the effective batch exactly.
        batch = max(b for b in range(1, largest + 1) if batch_now % b == 0)
        accumulation = targs.gradient_accumulation_steps * batch_now // batch
        fixes.append(f"--per_device_train_batch_size {batch} --gradient_accumulation_steps {accumulation}")

    def fits(quantization=None, checkpointing=None, **method_changes) -> bool:
        changed = dataclasses.replace(
            cfg, method=dataclasses.replace(method, **method_changes),
            model=dataclasses.replace(cfg.model, quantization=quantization or cfg.model.quantization),
            train=dataclasses.replace(targs, activation_checkpointing=(
                targs.activation_checkpointing if checkpointing is None else checkpointing)))
        try:
            check_method(changed.method, changed.model.quantization, changed.train.activation_checkpointing,
                         this_machine=False)
            return plan_run(changed, config, compute_dtype=_dtype(plan),
                            **{**(memory or {}), "context_bytes": context}).fits(capacity)
        except UserError:  # a combination the recipe would refuse fits nothing
            return False

    if not targs.activation_checkpointing and fits(checkpointing=True):
        fixes.append("--activation_checkpointing true")
    if cfg.model.quantization == "none" and method.method in (*LORA_FAMILY, "adalora") and fits(quantization="4bit"):
        fixes.append("--quantization 4bit")
    lower_ranks = [_rank_changes(method, r) for r in _halvings(_rank(method))]
    if lower_ranks and fits(**lower_ranks[-1]):  # rank 1 first: when even it does not fit, no rank does
        changes = next(c for c in lower_ranks if fits(**c))  # the largest that fits
        fixes.append(" ".join(f"--{name} {value}" for name, value in changes.items()))
    return fixes


def _rank(method) -> int:
    return method.init_r if method.method == "adalora" else method.r if method.method in LORA_FAMILY else 1


def _rank_changes(method, rank: int) -> dict[str, int]:
    if method.method == "adalora":  # target_r may not exceed the initial rank
        return {"init_r": rank, "target_r": min(method.target_r, rank)}
    return {"r": rank}


def _halvings(rank: int) -> list[int]:
    """rank // 2, rank // 4, ..., 1."""
    out = []
    while rank > 1:
        rank //= 2
        out.append(rank)
    return out


def _dtype(plan):
    import torch

    return getattr(torch, plan.compute_dtype)
