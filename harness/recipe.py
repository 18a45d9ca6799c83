"""The flow every recipe runs: check, load, adapt, train, evaluate, save, record.

A recipe is a name plus a dict of defaults; `run_recipe` parses the command line and config file
on top of them and runs `train`. All checks that need no model happen before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from harness.config import RunConfig, parse_args
from harness.errors import UserError, is_out_of_memory, reported_as_one_line

RESULT_FILE = "result.json"
RUN_MARKER = "recipe_run.json"
RANKS_FILE = "adalora_ranks.json"
RESULT_SCHEMA = 1

# The settings that decide what a checkpoint in output_dir contains: resuming with other values fails.
FINGERPRINT_KEYS = (
    "recipe", "model", "method", "quantization", "target_modules", "r", "init_r", "target_r",
    "num_virtual_tokens", "task", "data_file", "max_samples",
)


def run_recipe(name: str, defaults: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of every recipe script."""
    with reported_as_one_line(name):
        config = parse_args({**defaults, "recipe": name}, argv)
        return train(config)


def train(cfg: RunConfig) -> dict[str, Any]:
    from transformers import set_seed

    from harness import data as data_mod
    from harness.measure import PeakMemory, Stopwatch, git_state
    from harness.methods import adalora_schedule, check_method, count_optimizer_steps
    from harness.models import check_quantization

    clock = Stopwatch()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    code_version = git_state()  # at the start: the code that runs, not what the tree holds at the end

    # 1. Everything that can be refused without loading a model.
    check_method(cfg.method, cfg.model.quantization)
    check_quantization(cfg.model)
    rows = data_mod.load_records(cfg.data)
    train_rows, eval_rows = data_mod.split_records(rows, cfg.data)
    targs = cfg.train
    total_steps = count_optimizer_steps(
        len(train_rows), targs.per_device_train_batch_size, targs.gradient_accumulation_steps,
        targs.num_train_epochs, targs.max_steps,
    )
    schedule = adalora_schedule(cfg.method, total_steps) if cfg.method.method == "adalora" else None
    if not eval_rows:
        targs = dataclasses.replace(targs, eval_strategy="no", load_best_model_at_end=False)
    output_dir = claim_output_dir(cfg)
    set_seed(targs.seed)

    memory = PeakMemory()
    record: dict[str, Any] = {"status": "running"}
    try:
        record = _train_and_evaluate(cfg, targs, train_rows, eval_rows, schedule, output_dir, memory)
        record["status"] = "ok"
    except BaseException as exc:
        record["status"] = (
            "oom" if is_out_of_memory(exc)
            else "interrupted" if isinstance(exc, KeyboardInterrupt)
            else "refused" if isinstance(exc, UserError)
            else "failed"
        )
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback_tail"] = "".join(traceback.format_exception(exc))[-4000:]
        raise
    finally:
        record.update(_provenance(cfg, targs, started_at, clock.seconds(), memory, code_version))
        from harness.measure import write_json_atomic

        write_json_atomic(output_dir / RESULT_FILE, _ordered(record))
        if record["status"] == "ok":
            print(f"\nResult written to {output_dir / RESULT_FILE}")
    return record


def _train_and_evaluate(cfg, targs, train_rows, eval_rows, schedule, output_dir, memory) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers.trainer_utils import get_last_checkpoint

    from harness import data as data_mod
    from harness.evaluation import ClassificationScorer
    from harness.methods import final_adalora_ranks, peft_config
    from harness.models import load_model, load_tokenizer, parameter_counts
    from harness.training import AdaLoraAllocation, TrainClock, build_trainer

    tokenizer = load_tokenizer(cfg.model)
    prepared = data_mod.prepare(train_rows, eval_rows, cfg.data, tokenizer)
    print(f"Data: {json.dumps(prepared.stats)}")

    if targs.activation_checkpointing and not targs.activation_checkpointing_kwargs:
        # Non-reentrant checkpointing works with frozen inputs (PEFT) and is what PyTorch recommends.
        targs = dataclasses.replace(targs, activation_checkpointing_kwargs={"use_reentrant": False})
    targs = _mixed_precision(cfg, targs)
    if not torch.cuda.is_available():
        targs = dataclasses.replace(targs, dataloader_pin_memory=False)  # pinning needs a GPU

    model = load_model(cfg.model, cfg.method.method, targs.activation_checkpointing)
    config = peft_config(cfg.method, model, schedule)
    if config is not None:
        model = get_peft_model(model, config)
    trainable, total = parameter_counts(model)
    print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    if schedule is not None:
        print(f"AdaLoRA schedule: {dataclasses.asdict(schedule)}")

    scorer = None
    if cfg.data.task == "classification" and prepared.eval_examples:
        limit = cfg.data.eval_max_samples or len(prepared.eval_examples)
        scorer = ClassificationScorer(
            tokenizer, prepared.eval_examples[:limit], prepared.eval_prompts[:limit],
            data_mod.label_set(cfg.data), targs.per_device_eval_batch_size,
        )
    clock = TrainClock(cfg.run.budget_seconds, cfg.run.budget_tokens)
    callbacks = [clock] + ([AdaLoraAllocation(model)] if schedule is not None else [])
    trainer = build_trainer(model, tokenizer, targs, prepared, scorer, callbacks)

    last = get_last_checkpoint(str(output_dir)) if cfg.run.resume and output_dir.is_dir() else None
    if last:
        print(f"Resuming from {last}")
    outcome = trainer.train(resume_from_checkpoint=last)

    final_eval: dict[str, Any] = {}
    if prepared.eval is not None:
        final_eval = trainer.evaluate()
    trainer.save_model(str(output_dir))  # adapter_config.json + adapter_model.safetensors (or the full model)
    tokenizer.save_pretrained(str(output_dir))

    record: dict[str, Any] = {
        "global_step": trainer.state.global_step,
        "planned_steps": schedule.total_step if schedule else None,
        "stopped_by": clock.stopped_by,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": last,
        "train_seconds": round(clock.seconds, 3),
        "tokens_trained": clock.tokens,
        "tokens_per_second": round(clock.tokens / clock.seconds, 1) if clock.seconds > 0 else None,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 6),
        "adapter_bytes": _weights_bytes(output_dir),
        "train_loss": round(outcome.training_loss, 6) if outcome.global_step else None,
        "eval_loss": final_eval.get("eval_loss"),
        "eval": {
            **({"answer_token_accuracy": final_eval["eval_answer_token_accuracy"]}
               if "eval_answer_token_accuracy" in final_eval else {}),
            **trainer.last_task_metrics,
        },
        "data": {**data_mod.data_identity(cfg.data.data_file), **prepared.stats},
        "log_history": trainer.state.log_history,
    }
    if schedule is not None:
        record["adalora"] = _report_ranks(model, cfg, schedule, output_dir, final_adalora_ranks)
    return record


def _mixed_precision(cfg: RunConfig, targs):
    """Train in the dtype the model is loaded in, unless --bf16/--fp16 was given."""
    import torch

    from harness.models import compute_dtype

    if targs.bf16 or targs.fp16:
        return targs
    dtype = compute_dtype(cfg.model.dtype)
    if not torch.cuda.is_available() or dtype == torch.float32:
        return targs
    return dataclasses.replace(targs, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)


def _report_ranks(model, cfg, schedule, output_dir: Path, final_adalora_ranks) -> dict[str, Any]:
    from harness.measure import write_json_atomic

    ranks = final_adalora_ranks(model)
    report = {
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
        "modules": len(ranks),
        "initial_budget": cfg.method.init_r * len(ranks),
        "target_budget": cfg.method.target_r * len(ranks),
        "schedule": dataclasses.asdict(schedule),
    }
    write_json_atomic(output_dir / RANKS_FILE, report)
    print("\nFinal AdaLoRA ranks:")
    width = max(map(len, ranks), default=0)
    for name, rank in ranks.items():
        print(f"  {name:<{width}}  {rank:>3}")
    print(
        f"  total {report['total_rank']} over {len(ranks)} modules "
        f"(started at {report['initial_budget']}, target {report['target_budget']})"
    )
    return report


def _weights_bytes(output_dir: Path) -> int | None:
    files = list(output_dir.glob("adapter_model.safetensors")) or list(output_dir.glob("model*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def _provenance(cfg: RunConfig, targs, started_at: str, total_seconds: float, memory, code_version) -> dict[str, Any]:
    from harness.measure import command_line, device_name, versions

    return {
        "recipe": cfg.run.recipe,
        "method": cfg.method.method,
        "model": cfg.model.model,
        "quantization": cfg.model.quantization,
        "device": device_name(),
        **memory.read(),
        "total_seconds": round(total_seconds, 3),
        "seed": targs.seed,
        "started_at": started_at,
        "versions": versions(),
        "git": code_version,
        "command": command_line(cfg.run.recipe, cfg.argv),
        "config": cfg.to_dict(),
        "schema": RESULT_SCHEMA,
    }


_FIRST_KEYS = (
    "status", "recipe", "method", "model", "quantization", "device", "peak_memory_mb", "peak_memory_kind",
    "train_seconds", "total_seconds", "tokens_per_second", "trainable_params", "total_params",
    "adapter_bytes", "train_loss", "eval_loss", "eval", "adalora", "seed",
)


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    """Headline fields first, so result.json reads well; log_history last."""
    head = {k: record[k] for k in _FIRST_KEYS if k in record}
    rest = {k: v for k, v in record.items() if k not in head and k != "log_history"}
    return {**head, **rest, **({"log_history": record["log_history"]} if "log_history" in record else {})}


def claim_output_dir(cfg: RunConfig) -> Path:
    """Use output_dir for this run, refusing one that holds another recipe's run or other files."""
    from harness.measure import write_json_atomic

    output_dir = Path(cfg.train.output_dir)
    settings = cfg.to_dict()
    fingerprint = {k: settings.get(k) for k in FINGERPRINT_KEYS}
    marker = output_dir / RUN_MARKER
    if marker.is_file():
        try:
            previous = json.loads(marker.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            previous = {}
        if previous.get("recipe") != fingerprint["recipe"]:
            raise UserError(
                f"output_dir {output_dir} holds a run of recipe {previous.get('recipe')!r}, not "
                f"{fingerprint['recipe']!r}; pass another --output_dir or delete that folder"
            )
        changed = [f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in fingerprint.items() if previous.get(k) != v]
        resumable = any(output_dir.glob("checkpoint-*"))  # a run that never saved one can simply be redone
        if changed and cfg.run.resume and resumable:
            raise UserError(
                f"output_dir {output_dir} holds a run of this recipe with other settings ({'; '.join(changed)}); "
                "pass another --output_dir, delete that folder, or --resume false to start over in it"
            )
    elif output_dir.is_dir() and any(output_dir.iterdir()):
        raise UserError(
            f"output_dir {output_dir} is not empty and holds no run of this project; "
            "pass an empty or new --output_dir so nothing there is overwritten"
        )
    try:
        write_json_atomic(marker, fingerprint)
    except OSError as exc:
        raise UserError(f"cannot write to output_dir {output_dir} ({exc.strerror}); pass a writable --output_dir") from None
    return output_dir

