"""The Trainer the recipes use, and the callbacks that make it do what the recipes promise."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput

from harness.data import IGNORE_INDEX
from harness.evaluation import ANSWER_METRICS, answer_token_accuracy, keep_argmax
from harness.methods import (
    is_adalora,
    load_adalora_allocator,
    load_adalora_checkpoint,
    save_adalora_allocator,
)


class AdaLoraAllocation(TrainerCallback):
    """Runs AdaLoRA's rank allocation after every optimizer step.

    Neither transformers nor PEFT calls update_and_allocate, so without this the ranks never
    change. It must run in on_optimizer_step: by on_step_end the gradients it scores are zeroed.
    """

    def __init__(self, peft_model):
        self.peft_model = peft_model

    def on_optimizer_step(self, args, state, control, **kwargs):
        tuner = self.peft_model.base_model
        if not tuner.rankallocator.ipt:
            # Resumed without saved importance scores: score this step's gradients first, or the
            # final allocation (which scores nothing itself) has nothing to rank.
            tuner.rankallocator.update_ipt(tuner.model)
        # state.global_step still counts the steps before this one, as PEFT's schedule expects
        tuner.update_and_allocate(state.global_step)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():  # every process holds the same allocator
            save_adalora_allocator(self.peft_model, checkpoint)


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint complete, with the fingerprint of the settings that made it, once the
    Trainer and every earlier callback have written it. A rerun resumes only sealed checkpoints of its
    own settings (harness.rundir); one cut short by a kill while saving has no seal. Register it last.
    Under several processes each writes its own part (its random state, FSDP's optimizer shard): the main
    process seals once all of them have."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
        from harness.distributed import barrier
        from harness.rundir import seal_checkpoint

        barrier()
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and checkpoint.is_dir():
            seal_checkpoint(checkpoint, self.fingerprint, state.global_step)


def wait_for_gpu() -> None:
    """CUDA work is asynchronous: wait for it before reading a clock (nothing to wait for without a GPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class TrainClock(TrainerCallback):
    """Pure training time (optimizer steps only: no evaluation, no checkpoint saving) and the
    non-padding tokens trained on in this session, plus the step/time/token budgets."""

    def __init__(self, budget_seconds: float | None = None, budget_tokens: int | None = None):
        self.budget_seconds = budget_seconds
        self.budget_tokens = budget_tokens
        self.seconds = 0.0
        self.tokens_at_start = 0
        self.tokens = 0
        self.stopped_by: str | None = None
        self._step_start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_start = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        wait_for_gpu()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        wait_for_gpu()
        if self._step_start is not None:
            self.seconds += time.perf_counter() - self._step_start
            self._step_start = None
        self.tokens = state.num_input_tokens_seen - self.tokens_at_start
        if self.budget_seconds is not None and self.seconds >= self.budget_seconds:
            self.stopped_by = "budget_seconds"
        elif self.budget_tokens is not None and self.tokens >= self.budget_tokens:
            self.stopped_by = "budget_tokens"
        if self.stopped_by:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self.stopped_by is None:
            self.stopped_by = "max_steps" if args.max_steps > 0 else "epochs"


def run_callbacks(cfg, folder, *between: TrainerCallback) -> tuple[TrainClock, list[TrainerCallback]]:
    """Every run's callbacks: its train clock first, the objective's own (between), the checkpoint seal last
    (see SealCheckpoints). Returns the clock too, whose figures go into the record."""
    clock = TrainClock(cfg.run.budget_seconds, cfg.run.budget_tokens)
    return clock, [clock, *between, SealCheckpoints(folder.fingerprint)]


class RecipeTrainer(Trainer):
    """A Trainer whose evaluation also reports the task's own score (e.g. sentiment accuracy),
    so it is logged next to eval_loss and can select the best checkpoint."""

    def __init__(self, *args, task_scorer: Callable[[Any], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.task_scorer = task_scorer
        self.last_task_metrics: dict[str, Any] = {}
        self._scorer_is_the_loop = False

    # AdaLoRA checkpoints are saved pruned to their kept ranks; the Trainer's own loading cannot put
    # them back into the full-size model that is training (see methods.load_adalora_checkpoint).
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if is_adalora(self.model):
            load_adalora_checkpoint(self.model, resume_from_checkpoint)
            load_adalora_allocator(self.model, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self):
        if is_adalora(self.model):
            return load_adalora_checkpoint(self.model, self.state.best_model_checkpoint)
        return super()._load_best_model()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        accumulated = self.model.training and self.model_accepts_loss_kwargs and num_items_in_batch is not None
        factor = 1 / self.current_gradient_accumulation_steps if accumulated else 1
        with orth_penalty_scaled(self.model, factor):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # On the run's own eval set, a scorer that also scores the answers replaces the evaluation loop.
        # For this call only: predict() and an evaluation on another dataset run the Trainer's own loop.
        scorer_is_the_loop = eval_dataset is None and getattr(self.task_scorer, "scores_answers", False)
        self._scorer_is_the_loop = scorer_is_the_loop  # read by evaluation_loop
        try:
            with orth_penalty_scaled(self.model, 0.0):
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._scorer_is_the_loop = False
        if self.task_scorer is not None and not scorer_is_the_loop:
            numeric = self._score_task(metric_key_prefix, with_answer_metrics=False)
            self.log(numeric)
            metrics.update(numeric)
        return metrics

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The Trainer's loop, or (see evaluate) the task scorer's one pass: its label scores and the loss and
        answer-token accuracy of the same answer tokens, from the forward passes that score the labels.
        The Trainer still logs the metrics, adds its speed figures and runs the callbacks (best checkpoint,
        early stopping) as after its own loop."""
        if not self._scorer_is_the_loop:
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        metrics = self._score_task(metric_key_prefix, with_answer_metrics=True)
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                              num_samples=self.last_task_metrics["examples"])

    def _score_task(self, prefix: str, with_answer_metrics: bool) -> dict[str, float]:
        """Run the task scorer; keep its task scores in last_task_metrics, return the numeric metrics, prefixed."""
        scores = dict(self.task_scorer(self.model))
        answer_metrics = {k: scores.pop(k) for k in ANSWER_METRICS if k in scores}
        self.last_task_metrics = scores
        numeric = {**(answer_metrics if with_answer_metrics else {}), **scores}
        return {f"{prefix}_{k}": v for k, v in numeric.items() if isinstance(v, float)}


@contextlib.contextmanager
def orth_penalty_scaled(model, factor: float):
    """Scale AdaLoRA's orthogonality penalty for the duration of a forward pass.

    PEFT adds the penalty to the loss of every forward, in eval mode too. Two consequences:
    - eval_loss would include it, so it is switched off (factor 0) for evaluation: eval_loss is
      then the language-model loss, comparable across methods and across the adapter's resize.
    - with gradient accumulation the Trainer normalises the language-model loss over the whole
      accumulated batch (num_items_in_batch) and no longer divides each micro-batch's loss, so
      the per-micro-batch penalty would count gradient_accumulation_steps times per optimizer
      step; training scales it by 1 / accumulation steps to count it once, as configured.
    """
    if not is_adalora(model) or factor == 1:
        yield
        return
    config = model.peft_config[model.active_adapter]
    weight = config.orth_reg_weight
    config.orth_reg_weight = weight * factor
    try:
        yield
    finally:
        config.orth_reg_weight = weight


def build_trainer(model, tokenizer, training_args, data, task_scorer=None, callbacks=(), evaluation_only=False) -> RecipeTrainer:
    """The run's Trainer. evaluation_only (method none): a quantized model without an adapter is accepted;
    the Trainer refuses one because it cannot train, and this one is only ever evaluated."""
    collator = DataCollatorForSeq2Seq(
        tokenizer,
        padding=True,  # dynamic: pad each batch to its longest example, not to max_seq_length
        label_pad_token_id=IGNORE_INDEX,
        pad_to_multiple_of=8 if torch.cuda.is_available() else None,  # tensor-core friendly shapes
    )
    from unittest import mock

    import transformers.trainer as hf_trainer

    accept_quantized = (mock.patch.object(hf_trainer, "validate_quantization_for_training", lambda model: None)
                        if evaluation_only else contextlib.nullcontext())
    with accept_quantized:
        return RecipeTrainer(
            model=model,
            args=training_args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=collator,
            processing_class=tokenizer,
            compute_metrics=answer_token_accuracy if data.eval is not None else None,
            preprocess_logits_for_metrics=keep_argmax if data.eval is not None else None,
            task_scorer=task_scorer,
            callbacks=list(callbacks),
        )


def shard_adapters_apart(trainer) -> None:
    """Under FSDP, wrap the adapter's trainable weights apart from the frozen base (PEFT's FSDP guide):
    with use_orig_params false, FSDP cannot mix trainable and frozen weights in one flat shard."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or not hasattr(trainer.model, "peft_config"):
        return
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(trainer.model)


def save_final(trainer, tokenizer, staging: Path) -> None:
    """The trained weights (the adapter, or the whole model) and the tokenizer into the staging folder. Every
    process calls it (FSDP gathers the shards to save them whole); the Trainer and this write from the main
    process only."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        plugin.set_state_dict_type("FULL_STATE_DICT")  # whole files that from_pretrained reloads
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
