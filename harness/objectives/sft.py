"""Supervised fine-tuning, the objective of 17 of the recipes: data read, split and tokenized by harness.data,
trained by TRL's SFTTrainer (harness.objectives.sft_trainer), scored on the held-out set (and the forgetting probe),
AdaLoRA's ranks reported."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from peft import get_peft_model

from harness.data import reading as data_mod
from harness.data.encoding import prepare as encode_for_training
from harness.errors import UserError
from harness.evaluation.scores import ClassificationScorer, ForgettingProbe
from harness.files import write_json_atomic
from harness.models.backends import unsloth_model
from harness.models.loading import load_model, print_parameter_counts, resolve_model
from harness.models.methods import (
    adalora_schedule,
    count_optimizer_steps,
    final_adalora_ranks,
    flattens,
    initialise_loftq,
    load_adapter_weights,
    peft_config,
)
from harness.objectives.protocol import Objective, Workload
from harness.objectives.sft_trainer import (
    AdaLoraAllocation,
    apply_tokenizer_settings,
    build_trainer,
    packed_examples_mix,
    sft_settings,
)
from harness.reporting.summary import evaluation_rows
from harness.reporting.tables import noise_verdict
from harness.run import distributed
from harness.run.checks import common_checks
from harness.run.config import RunConfig
from harness.run.distributed import batch_factor
from harness.run.folder import RunFolder
from harness.run.record import run_record
from harness.run.training import run_callbacks, save_final, shard_adapters_apart, train_from, trainer_settings

RANKS_FILE = "adalora_ranks.json"


def preflight(cfg: RunConfig, output_dir: bool = True) -> Workload:
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
    targs = _training_settings(cfg, targs, bool(eval_rows))
    forgetting = data_mod.load_forgetting_records(cfg.data)
    return Workload(loaded, eval_loaded, train_rows, eval_rows, targs, schedule, forgetting)


def _training_settings(cfg: RunConfig, train, evaluates: bool):
    targs = sft_settings(cfg, train)
    if not evaluates:
        targs = dataclasses.replace(targs, eval_strategy="no", load_best_model_at_end=False)
    return targs


def prepare(cfg: RunConfig, work: Workload, tokenizer):
    apply_tokenizer_settings(work.targs, tokenizer)  # --chat_template_path, --eos_token: before tokenizing, as TRL does
    return encode_for_training(work.train_rows, work.eval_rows, cfg.data, tokenizer)  # refuses a too-short window


def train_and_evaluate(cfg, work: Workload, tokenizer, prepared, folder: RunFolder, memory) -> dict[str, Any]:
    targs, schedule = trainer_settings(cfg, work.targs), work.schedule

    if cfg.model.backend == "unsloth":

        model = unsloth_model(cfg.model, cfg.method, cfg.data.max_seq_length, targs.activation_checkpointing, targs.seed)
        # Unsloth checkpoints activations its own way (offloaded to CPU RAM); the Trainer must not redo it.
        targs = dataclasses.replace(targs, activation_checkpointing=False)
    else:
        model = load_model(cfg.model, cfg.method.method, targs.activation_checkpointing)
    forgetting = None
    if work.forgetting is not None:
        # Measured on the model as loaded (quantized if asked), before any adapter or training touches it.
        forgetting = ForgettingProbe(
            tokenizer, cfg.data.forgetting_file, work.forgetting.rows, cfg.data.forgetting_samples,
            cfg.data.max_seq_length, data_mod.seen_texts(work.train_rows), targs.per_device_eval_batch_size,
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
        mixing = packed_examples_mix(model, len(tokenizer))
        if mixing and not targs.packing and not cfg.user_set("padding_free"):
            # The recipe's default, not the user's ask: padded batches instead, said in one line.
            print(f"Padding-free: off, {mixing}; batches padded to their longest instead")
            cfg.train.padding_free = False  # so result.json records how the run trained
            targs = trainer_settings(cfg, _training_settings(cfg, cfg.train, bool(work.eval_rows)))
        elif mixing:
            raise UserError(f"{mixing}: drop --packing / --padding_free for this model")
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

    baseline = cfg.method.method == "none"
    if baseline:
        print("Method none: nothing trains; the untrained model is scored as loaded (the baseline).")
        outcome = None
    else:  # resumes only ever a complete checkpoint of exactly these settings (harness.run.folder)
        outcome = train_from(trainer, folder)

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
        cfg, trainer, clock, outcome, (trainable, total), folder, work, prepared.stats,
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
        record["adalora"] = _report_ranks(model, cfg, schedule, staging)
    return record


def _evaluation_before_training(log_history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The scores of the evaluation --eval_on_start ran before the first optimizer step; None when there
    was none or nothing trained."""
    if not any("loss" in entry or "train_loss" in entry for entry in log_history):
        return None  # method none: its only evaluation is at step 0 too, but there is no before and after
    first = next(iter(evaluation_rows(log_history)), {})
    return {k: v for k, v in first.items() if k.startswith("eval_")} if first.get("step") == 0 else None


def _before_and_after(before: dict[str, Any], after_loss: float | None, after: dict[str, Any], steps: int) -> str:
    """One line a newcomer reads: the held-out score of the untrained model and of the trained one."""
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


def _report_ranks(model, cfg, schedule, output_dir: Path) -> dict[str, Any]:
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


SFT = Objective(preflight, prepare, train_and_evaluate)
