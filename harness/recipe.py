"""The flow every recipe runs: check, claim output_dir, load, adapt, train, evaluate, save, record.

A recipe is a name plus a dict of defaults; `run_recipe` parses the command line and config file
on top of them and runs `train`. Everything that can be refused without a model (preflight, then
the tokenizer-dependent checks) is refused before output_dir is touched; harness.rundir decides
what a rerun into an existing output_dir does.
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
from harness.errors import UserError, is_out_of_memory, reported_as_one_line, signals_deferred
from harness.rundir import RESULT_FILE, RunFolder, check_output_dir, claimed

RANKS_FILE = "adalora_ranks.json"
RESULT_SCHEMA = 1
INTERRUPTED_NOTE = (
    "the run's record says so and its checkpoints are kept: rerun the same command to resume from the last one"
)


def run_recipe(name: str, defaults: dict[str, Any], argv: list[str] | None = None,
               reward_funcs: tuple = ()) -> dict[str, Any]:
    """Entry point of every recipe script. reward_funcs: a GRPO recipe's reward functions (TRL's signature)."""
    from harness.distributed import main_speaks

    with reported_as_one_line(name, INTERRUPTED_NOTE), main_speaks():  # under accelerate launch: one voice
        config = parse_args({**defaults, "recipe": name}, argv)
        return train(dataclasses.replace(config, reward_funcs=tuple(reward_funcs)))


def load_recipe(recipe: str | Path):
    """A recipe script as a module (its DEFAULTS, a GRPO recipe's reward functions), without running it: the
    name of a script in recipes/, or a script's path."""
    import importlib.util

    from harness.config import REPO_ROOT

    script = Path(recipe) if str(recipe).endswith(".py") else REPO_ROOT / "recipes" / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Plan:
    """What a run will train on and for how long, known before any model or tokenizer is loaded."""

    data: Any  # harness.data.RecordFile of data_file
    eval_data: Any  # ... of eval_file, or None
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    targs: Any  # TrainingArguments, adjusted (no evaluation without eval rows)
    schedule: Any  # AdaLoraSchedule or None
    forgetting: Any = None  # RecordFile of forgetting_file, or None when not measured

    def left_out(self) -> dict[str, Any]:
        """Rows left out for having no text, per file, for result.json."""
        files = {"data_file": self.data, "eval_file": self.eval_data}
        return {name: part.report() for name, part in files.items() if part is not None}

    def left_out_lines(self) -> list[str]:
        return [part.summary() for part in (self.data, self.eval_data) if part is not None and part.left_out]


def preflight(cfg: RunConfig, output_dir: bool = True) -> Plan:
    """Everything that can be refused without loading a model or tokenizer: every setting's range, the
    method / backend / quantization combination, what is in output_dir (unless output_dir=False), the
    data, the AdaLoRA schedule. harness.bench calls it for every planned trial, so a sweep never starts
    a trial its recipe would refuse."""
    from harness.objectives import objective_of

    return objective_of(cfg).preflight(cfg, output_dir)


def common_checks(cfg: RunConfig, output_dir: bool) -> None:
    """The checks every objective makes first: ranges, method / backend / quantization, output_dir."""
    from harness.backends import check_backend, resolve_backend
    from harness.checks import check_settings
    from harness.distributed import check_launch
    from harness.methods import check_init_adapter
    from harness.models import check_quantization

    check_settings(cfg)
    cfg.model.backend = resolve_backend(cfg.model.backend, cfg.method.method)  # result.json says which ran
    check_backend(cfg.model.backend, cfg.method.method, cfg.model.quantization)
    check_init_adapter(cfg.run.init_adapter, cfg.method)
    check_quantization(cfg.model)
    check_launch(cfg)
    if output_dir:
        check_output_dir(cfg)


def _sft_preflight(cfg: RunConfig, output_dir: bool = True) -> Plan:
    from harness import data as data_mod
    from harness.distributed import batch_factor
    from harness.methods import adalora_schedule, count_optimizer_steps
    from harness.training import sft_settings

    common_checks(cfg, output_dir)
    loaded, eval_loaded = data_mod.load_records(cfg.data), data_mod.load_eval_records(cfg.data)
    train_rows, eval_rows = data_mod.split_records(loaded.rows, cfg.data, eval_loaded)
    targs = cfg.train
    total_steps = count_optimizer_steps(
        # Under several processes each micro-step takes a batch per process from the data.
        len(train_rows), targs.per_device_train_batch_size * batch_factor(), targs.gradient_accumulation_steps,
        targs.num_train_epochs, targs.max_steps,
    )
    schedule = adalora_schedule(cfg.method, total_steps) if cfg.method.method == "adalora" else None
    targs = sft_settings(cfg, targs)
    if not eval_rows:
        targs = dataclasses.replace(targs, eval_strategy="no", load_best_model_at_end=False)
    forgetting = data_mod.load_forgetting_records(cfg.data)
    return Plan(loaded, eval_loaded, train_rows, eval_rows, targs, schedule, forgetting)


def _sft_prepare(cfg: RunConfig, plan: Plan, tokenizer):
    from harness.encoding import prepare
    from harness.training import apply_tokenizer_settings

    apply_tokenizer_settings(plan.targs, tokenizer)  # --chat_template_path, --eos_token: before tokenizing, as TRL does
    return prepare(plan.train_rows, plan.eval_rows, cfg.data, tokenizer)  # refuses a too-short window


@dataclass(frozen=True)
class Objective:
    """The three steps a run's objective supplies to the shared flow of train()."""

    preflight: Any  # (cfg, output_dir) -> Plan: every check that needs no model or tokenizer
    prepare: Any  # (cfg, plan, tokenizer) -> data with .stats: every check that needs the tokenizer
    train_and_evaluate: Any  # (cfg, plan, tokenizer, prepared, folder, memory) -> the record's fields


def train(cfg: RunConfig) -> dict[str, Any]:
    from transformers import set_seed

    from harness import progress
    from harness.distributed import is_main
    from harness.measure import PeakMemory, apply_memory_budget
    from harness.methods import check_targets
    from harness.models import load_tokenizer
    from harness.objectives import objective_of
    from harness.plan.preflight import check_memory_plan

    objective = objective_of(cfg)
    start = RunStart.now()
    plan = objective.preflight(cfg, True)
    progress.configure(disable=bool(plan.targs.disable_tqdm) or not is_main())  # the Trainer's own rule
    for line in plan.left_out_lines():
        print(f"Data: {line}")
    memory_plan = check_memory_plan(cfg, plan.targs)  # before anything is downloaded or loaded
    tokenizer = load_tokenizer(cfg.model)
    check_targets(cfg.method, cfg.model, cfg.run.init_adapter)  # layer names, before any weights load
    prepared = objective.prepare(cfg, plan, tokenizer)
    print(f"Data: {json.dumps(prepared.stats)}")

    with claimed(cfg) as folder:  # from here on output_dir is this run's (see harness.rundir)
        if folder.finished is not None:
            print(
                f"{folder.path} already holds this run, finished (status ok, started {folder.finished.get('started_at')}): "
                "nothing to do. --resume false trains it again (the finished files are replaced only when the new "
                "run finishes); another --output_dir keeps both."
            )
            return folder.finished
        set_seed(plan.targs.seed)
        memory_budget = apply_memory_budget(cfg.run.memory_budget_gb)  # before CUDA allocates anything
        memory = PeakMemory()
        with recorded_run(folder, cfg, start, memory, {**memory_budget, "memory_plan": memory_plan}) as record:
            record.update(objective.train_and_evaluate(cfg, plan, tokenizer, prepared, folder, memory))
    print(f"\nResult written to {folder.path / RESULT_FILE}")
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
def recorded_run(folder: RunFolder, cfg: RunConfig, start: RunStart, memory=None, extra: dict[str, Any] | None = None):
    """Yield the run's record to fill in; write it however the run ends: status ok (after the staged
    final files are moved into place), or failed / oom / interrupted / refused with the error, always
    with its provenance. A record that is not ok never replaces a finished run's result.json."""
    from harness.distributed import is_main

    record: dict[str, Any] = {"status": "running"}
    try:
        yield record
    except BaseException as exc:
        record["status"] = (
            "oom" if is_out_of_memory(exc)
            else "interrupted" if isinstance(exc, KeyboardInterrupt)
            else "refused" if isinstance(exc, UserError)
            else "failed"
        )
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback_tail"] = "".join(traceback.format_exception(exc))[-4000:]
        if is_main():  # the other processes may be gone or stuck: this process's own figures only
            record.update({**_provenance(cfg, start, folder, memory, every_process=False), **(extra or {})})
            folder.write_record(_ordered(record))
        raise
    # Every process: under several, their peak memory is gathered here (a collective step).
    record.update({"status": "ok", **_provenance(cfg, start, folder, memory), **(extra or {})})
    if not is_main():
        return
    with signals_deferred():  # the files and the record that describes them change together
        folder.promote(record)
        folder.write_record(_ordered(record))


def _train_and_evaluate(cfg, plan: Plan, tokenizer, prepared, folder: RunFolder, memory) -> dict[str, Any]:
    from peft import get_peft_model

    from harness import data as data_mod
    from harness.evaluation import ClassificationScorer, ForgettingProbe
    from harness.methods import final_adalora_ranks, initialise_loftq, load_adapter_weights, peft_config
    from harness.models import load_model, print_parameter_counts, resolve_model
    from harness.training import (
        AdaLoraAllocation,
        build_trainer,
        check_packed_attention,
        flattens,
        run_callbacks,
        save_final,
        shard_adapters_apart,
    )

    targs, schedule = trainer_settings(cfg, plan.targs), plan.schedule

    if cfg.model.backend == "unsloth":
        from harness.backends import unsloth_model

        model = unsloth_model(cfg.model, cfg.method, cfg.data.max_seq_length, targs.activation_checkpointing, targs.seed)
        # Unsloth checkpoints activations its own way (offloaded to CPU RAM); the Trainer must not redo it.
        targs = dataclasses.replace(targs, activation_checkpointing=False)
    else:
        model = load_model(cfg.model, cfg.method.method, targs.activation_checkpointing)
    forgetting = None
    if plan.forgetting is not None:
        # Measured on the model as loaded (quantized if asked), before any adapter or training touches it.
        forgetting = ForgettingProbe(
            tokenizer, cfg.data.forgetting_file, plan.forgetting.rows, cfg.data.forgetting_samples,
            cfg.data.max_seq_length, data_mod.seen_texts(plan.train_rows), targs.per_device_eval_batch_size,
        )
        forgetting.measure_before(model)
    # PEFT and TRL still read transformers' old name for checkpointing, which warns on every read.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.model.backend != "unsloth":
        config = peft_config(cfg.method, model, schedule)
        if config is not None:
            model = get_peft_model(model, config)
        if cfg.method.method == "loftq" and cfg.model.quantization == "4bit":
            initialise_loftq(model, resolve_model(cfg.model.model))
    if cfg.run.init_adapter:
        load_adapter_weights(model, cfg.run.init_adapter)
    if cfg.method.method == "none":
        model.requires_grad_(False)  # the baseline: scored exactly as loaded
    if flattens(targs) or targs.packing:
        check_packed_attention(model, len(tokenizer))
    trainable, total = print_parameter_counts(model)
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
            # Scoring every eval example, it also gives the eval loss: no second pass over the eval set.
            answers=prepared.eval_answers if limit >= len(prepared.eval_examples) else None,
        )
    clock, callbacks = run_callbacks(cfg, folder, *([AdaLoraAllocation(model)] if schedule is not None else []))
    trainer = build_trainer(model, tokenizer, targs, prepared, scorer, callbacks,
                            evaluation_only=cfg.method.method == "none")
    shard_adapters_apart(trainer)

    last = folder.resume_from  # only ever a complete checkpoint of exactly these settings
    if last:
        print(f"Resuming from {last}")
    baseline = cfg.method.method == "none"
    if baseline:
        print("Method none: nothing trains; the untrained model is scored as loaded (the baseline).")
        outcome = None
    else:
        outcome = trainer.train(resume_from_checkpoint=last)

    final_eval: dict[str, Any] = {}
    if prepared.eval is not None:
        final_eval = _evaluation_of_final_weights(trainer, scorer) or trainer.evaluate()
    before = _evaluation_before_training(trainer.state.log_history)
    line = _before_and_after(before, final_eval.get("eval_loss"), trainer.last_task_metrics,
                             trainer.state.global_step) if before else ""
    if line:
        print(line)
    forgetting_report = forgetting.report(model, trained=not baseline) if forgetting is not None else None
    if forgetting_report:
        print(f"Forgetting: loss on {forgetting_report['texts']} general texts {forgetting_report['loss_before']:.4f} "
              f"before, {forgetting_report['loss_after']:.4f} after (delta {forgetting_report['delta']:+.4f})")
    # Final files go to a staging folder; they replace a finished run's only once this record is ok.
    staging = folder.staging
    if not baseline:  # the baseline has no weights of its own to save
        save_final(trainer, tokenizer, staging)  # adapter_config.json + adapter_model.safetensors (or the model)

    record = run_record(
        cfg, trainer, clock, outcome, (trainable, total), folder, plan, prepared.stats,
        planned_steps=schedule.total_step if schedule else None,
        stopped_by="method none (no training)" if baseline else clock.stopped_by,
        scores={
            "eval_loss": final_eval.get("eval_loss"),
            "eval": {
                **({"answer_token_accuracy": final_eval["eval_answer_token_accuracy"]}
                   if "eval_answer_token_accuracy" in final_eval else {}),
                **trainer.last_task_metrics,
            },
            "forgetting": forgetting_report,
            "before_training": before,  # --eval_on_start: the untrained model's scores, the run's own baseline
        },
    )
    if schedule is not None:
        record["adalora"] = _report_ranks(model, cfg, schedule, staging, final_adalora_ranks)
    return record


SFT = Objective(_sft_preflight, _sft_prepare, _train_and_evaluate)


def trainer_settings(cfg: RunConfig, targs):
    """The Trainer settings every objective runs with: non-reentrant checkpointing, mixed precision from
    the model's dtype, no pinned memory without a GPU, no search for unused weights under DDP."""
    import torch

    from harness.distributed import launched_processes

    if targs.activation_checkpointing and not targs.activation_checkpointing_kwargs:
        # Non-reentrant checkpointing works with frozen inputs (PEFT) and is what PyTorch recommends.
        targs = dataclasses.replace(targs, activation_checkpointing_kwargs={"use_reentrant": False})
    targs = _mixed_precision(cfg, targs)
    if not torch.cuda.is_available():
        targs = dataclasses.replace(targs, dataloader_pin_memory=False)  # pinning needs a GPU
    if launched_processes() > 1 and targs.ddp_find_unused_parameters is None and cfg.method.method != "full":
        # Every adapter weight takes part in every forward pass: DDP need not search the graph for unused ones
        # (a whole model may hold weights its forward pass skips: there the Trainer's default stays).
        targs = dataclasses.replace(targs, ddp_find_unused_parameters=False)
    return targs


def run_record(cfg: RunConfig, trainer, clock, outcome, counts: tuple[int, int], folder: RunFolder, plan: Plan,
               stats: dict[str, Any], planned_steps: int | None, stopped_by: str | None,
               scores: dict[str, Any]) -> dict[str, Any]:
    """The fields every objective's result.json has (scores: eval_loss, eval, before_training, ... in
    between, as the objective has them). The final files are already in folder.staging."""
    from harness.data import data_source

    trainable, total = counts
    return {
        "global_step": trainer.state.global_step,
        "planned_steps": planned_steps,
        "stopped_by": stopped_by,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "resumed_from": folder.resume_from,
        "train_seconds": round(clock.seconds, 3),
        "tokens_trained": clock.tokens,
        "tokens_per_second": round(clock.tokens / clock.seconds, 1) if clock.seconds > 0 else None,
        # SFT: input positions computed, padding included (this process's; under several, not recorded)
        **({"positions_trained": trainer.positions_trained}
           if hasattr(trainer, "positions_trained") and trainer.accelerator.num_processes == 1 else {}),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": round(100 * trainable / total, 6),
        **_saved_weights_bytes(folder.staging),
        "train_loss": round(outcome.training_loss, 6) if outcome is not None and outcome.global_step else None,
        **scores,
        "data": {"data_file": data_source(cfg.data), "data_sha256": folder.settings["data_file_sha256"],  # hashed once
                 **stats, "rows_left_out": plan.left_out()},
        "log_history": trainer.state.log_history,
    }


def _evaluation_before_training(log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The scores of the evaluation --eval_on_start ran before the first optimizer step; None when there
    was none or nothing trained."""
    from harness.summary import evaluation_rows

    if not any("loss" in entry or "train_loss" in entry for entry in log_history):
        return None  # method none: its only evaluation is at step 0 too, but there is no before and after
    first = next(iter(evaluation_rows(log_history)), {})
    return {k: v for k, v in first.items() if k.startswith("eval_")} if first.get("step") == 0 else None


def _before_and_after(before: dict[str, Any], after_loss: float | None, after: dict[str, Any], steps: int) -> str:
    """One line a newcomer reads: the held-out score of the untrained model and of the trained one."""
    from harness.report import noise_verdict

    if "eval_accuracy" in before and "accuracy" in after:
        gain = after["accuracy"] - before["eval_accuracy"]
        verdict = noise_verdict(gain, after.get("accuracy_se"), before.get("eval_accuracy_se"))
        return (f"Held-out accuracy on {after['examples']} examples: {before['eval_accuracy']:.3f} untrained -> "
                f"{after['accuracy']:.3f} after {steps} steps ({gain:+.3f}, {verdict})")
    if "eval_loss" in before and after_loss is not None:
        return f"Held-out eval loss: {before['eval_loss']:.4f} untrained -> {after_loss:.4f} after {steps} steps"
    return ""


def _evaluation_of_final_weights(trainer, scorer) -> dict[str, Any] | None:
    """The metrics of the evaluation the Trainer already ran at the last step, when the model still holds
    those weights (no earlier best checkpoint was loaded back), so it is not run a second time."""
    state = trainer.state
    if not state.global_step or (scorer is not None and not trainer.last_task_metrics):
        return None
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint and \
            Path(state.best_model_checkpoint).name != f"checkpoint-{state.global_step}":
        return None
    entries = [e for e in state.log_history if "eval_loss" in e]
    if not entries or entries[-1].get("step") != state.global_step:
        return None
    return entries[-1]


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
    from harness import distributed
    from harness.measure import write_json_atomic

    ranks = final_adalora_ranks(model)
    several = distributed.launched_processes() > 1
    if several:
        # DDP all-reduces the gradients AdaLoRA scores, so every process must have kept the same ranks;
        # an adapter that differs between processes is not one adapter, and the run must not call itself ok.
        pattern = model.peft_config[model.active_adapter].rank_pattern  # which ranks each module kept
        differing = [i for i, other in enumerate(distributed.gather(pattern)) if other != pattern]
        if differing:
            raise RuntimeError(f"AdaLoRA's final ranks differ between processes ({differing} vs process "
                               f"{distributed.rank()}): the allocation did not see the same gradients everywhere")
    report = {
        "ranks": ranks,
        "total_rank": sum(ranks.values()),
        "modules": len(ranks),
        "initial_budget": cfg.method.init_r * len(ranks),
        "target_budget": cfg.method.target_r * len(ranks),
        "schedule": dataclasses.asdict(schedule),
        **({"same_in_every_process": True} if several else {}),
    }
    if distributed.is_main():
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


def _provenance(cfg: RunConfig, start: RunStart, folder: RunFolder, memory=None,
                every_process: bool = True) -> dict[str, Any]:
    """every_process: under several processes, gather every one's peak memory (each must be here too)."""
    from harness.distributed import describe
    from harness.measure import command_line, device_name, peak_rss_mb, versions
    from harness.offline_models import OFFLINE_MODELS

    measured = memory.read() if memory is not None else {"process_peak_rss_mb": round(peak_rss_mb(), 1)}

    return {
        "recipe": cfg.run.recipe,
        "objective": cfg.run.objective,
        "method": cfg.method.method,
        "backend": cfg.model.backend,
        "model": cfg.model.model,
        # What an offline model's weights are (random, or smollm2's Q4_1-dequantized ones): a reader of the
        # record must not mistake them for the Hub's originals.
        **({"model_weights": OFFLINE_MODELS[cfg.model.model]} if cfg.model.model in OFFLINE_MODELS else {}),
        "quantization": cfg.model.quantization,
        "device": device_name(),
        **describe(measured, device_name(), every_process),
        "total_seconds": round(start.clock.seconds(), 3),
        "seed": cfg.train.seed,
        "started_at": start.started_at,
        "versions": versions(),
        "git": start.git,
        "command": command_line(cfg.run.recipe, cfg.argv),
        "config": cfg.to_dict(),
        # What a rerun compares to decide between "nothing to do", resume and refuse (harness.rundir).
        "fingerprint": folder.fingerprint,
        "inputs_sha256": {k: v for k, v in folder.settings.items() if k.endswith("_sha256")},
        "schema": RESULT_SCHEMA,
    }


_FIRST_KEYS = (
    "status", "recipe", "objective", "method", "backend", "model", "quantization", "device", "peak_memory_mb", "peak_memory_kind",
    "train_seconds", "total_seconds", "tokens_per_second", "trainable_params", "total_params",
    "adapter_bytes", "model_bytes", "train_loss", "eval_loss", "eval", "adalora", "seed",
)


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    """Headline fields first, so result.json reads well; log_history last."""
    head = {k: record[k] for k in _FIRST_KEYS if k in record}
    rest = {k: v for k, v in record.items() if k not in head and k != "log_history"}
    return {**head, **rest, **({"log_history": record["log_history"]} if "log_history" in record else {})}
