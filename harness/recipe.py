"""The flow every recipe runs: check, load, adapt, train, evaluate, save, record.

A recipe is a name plus a dict of defaults; `run_recipe` parses the command line and config file
on top of them and runs `train`. All checks that need no model happen before any model is loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import traceback
import warnings
from dataclasses import dataclass
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
    "recipe", "model", "backend", "method", "quantization", "target_modules", "r", "init_r", "target_r",
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
    from harness.backends import check_backend, resolve_backend
    from harness.measure import PeakMemory, apply_memory_budget
    from harness.methods import adalora_schedule, check_init_adapter, check_method, count_optimizer_steps
    from harness.models import check_quantization

    start = RunStart.now()

    # 1. Everything that can be refused without loading a model.
    cfg.model.backend = resolve_backend(cfg.model.backend, cfg.method.method)  # result.json says which ran
    check_backend(cfg.model.backend, cfg.method.method, cfg.model.quantization)
    check_method(cfg.method, cfg.model.quantization, cfg.train.activation_checkpointing)
    check_init_adapter(cfg.run.init_adapter, cfg.method.method)
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

    memory_budget = apply_memory_budget(cfg.run.memory_budget_gb)  # before CUDA allocates anything
    memory = PeakMemory()
    with recorded_run(output_dir / RESULT_FILE, cfg, start, memory, memory_budget) as record:
        record.update(_train_and_evaluate(cfg, targs, train_rows, eval_rows, schedule, output_dir, memory))
    print(f"\nResult written to {output_dir / RESULT_FILE}")
    return record


@dataclass
class RunStart:
    """Taken when a run starts: its clock, its UTC start time and the code it runs (git state now,
    not what the tree holds when the run ends)."""

    clock: Any
    started_at: str
    git: dict[str, Any]

    @classmethod
    def now(cls) -> "RunStart":
        from harness.measure import Stopwatch, git_state

        return cls(Stopwatch(), dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), git_state())


@contextlib.contextmanager
def recorded_run(path: Path, cfg: RunConfig, start: RunStart, memory=None, extra: dict[str, Any] | None = None):
    """Yield the run's record to fill in; write it to `path` however the run ends: status ok, or
    failed / oom / interrupted / refused with the error, always with its provenance."""
    from harness.measure import write_json_atomic

    record: dict[str, Any] = {"status": "running"}
    try:
        yield record
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
        record.update(_provenance(cfg, start, memory))
        record.update(extra or {})
        write_json_atomic(path, _ordered(record))


def _train_and_evaluate(cfg, targs, train_rows, eval_rows, schedule, output_dir, memory) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from transformers.trainer_utils import get_last_checkpoint

    from harness import data as data_mod
    from harness.evaluation import ClassificationScorer
    from harness.methods import final_adalora_ranks, initialise_loftq, load_adapter_weights, peft_config
    from harness.models import load_model, load_tokenizer, parameter_counts, resolve_model
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

    if cfg.model.backend == "unsloth":
        from harness.backends import unsloth_model

        model = unsloth_model(cfg.model, cfg.method, cfg.data.max_seq_length, targs.activation_checkpointing, targs.seed)
        # Unsloth checkpoints activations its own way (offloaded to CPU RAM); the Trainer must not redo it.
        targs = dataclasses.replace(targs, activation_checkpointing=False)
    else:
        model = load_model(cfg.model, cfg.method.method, targs.activation_checkpointing)
        config = peft_config(cfg.method, model, schedule)
        if config is not None:
            model = get_peft_model(model, config)
        if cfg.method.method == "loftq" and cfg.model.quantization == "4bit":
            initialise_loftq(model, resolve_model(cfg.model.model))
    if cfg.run.init_adapter:
        load_adapter_weights(model, cfg.run.init_adapter)
    trainable, total = parameter_counts(model)
    print(f"Trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
    if schedule is not None:
        print(f"AdaLoRA schedule: {dataclasses.asdict(schedule)}")
        # AdaLoRA may prune a module to rank 0; PEFT then warns on every save that the empty tensors
        # look like unsharded DeepSpeed/FSDP weights. They are not, and the adapter reloads correctly.
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape.*")

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
        **_saved_weights_bytes(output_dir),
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


def _saved_weights_bytes(output_dir: Path) -> dict[str, int]:
    """Size of what was saved: the adapter, or after full fine-tuning the whole model (model_bytes;
    there is no adapter then, so no adapter_bytes)."""
    adapter = output_dir / "adapter_model.safetensors"
    if adapter.is_file():
        return {"adapter_bytes": adapter.stat().st_size}
    shards = list(output_dir.glob("model*.safetensors"))
    return {"model_bytes": sum(f.stat().st_size for f in shards)} if shards else {}


def _provenance(cfg: RunConfig, start: RunStart, memory=None) -> dict[str, Any]:
    from harness.measure import command_line, device_name, peak_rss_mb, versions

    return {
        "recipe": cfg.run.recipe,
        "method": cfg.method.method,
        "backend": cfg.model.backend,
        "model": cfg.model.model,
        "quantization": cfg.model.quantization,
        "device": device_name(),
        **(memory.read() if memory is not None else {"process_peak_rss_mb": round(peak_rss_mb(), 1)}),
        "total_seconds": round(start.clock.seconds(), 3),
        "seed": cfg.train.seed,
        "started_at": start.started_at,
        "versions": versions(),
        "git": start.git,
        "command": command_line(cfg.run.recipe, cfg.argv),
        "config": cfg.to_dict(),
        "schema": RESULT_SCHEMA,
    }


_FIRST_KEYS = (
    "status", "recipe", "method", "backend", "model", "quantization", "device", "peak_memory_mb", "peak_memory_kind",
    "train_seconds", "total_seconds", "tokens_per_second", "trainable_params", "total_params",
    "adapter_bytes", "model_bytes", "train_loss", "eval_loss", "eval", "adalora", "seed",
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

