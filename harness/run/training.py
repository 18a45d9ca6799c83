"""What every objective's Trainer shares: its settings (checkpointing, mixed precision, DDP), the callbacks that
keep the recipes' promises (the step clock, sealed checkpoints) and saving the final files."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from harness.models.loading import compute_dtype
from harness.run.config import RunConfig
from harness.run.distributed import barrier, launched_processes
from harness.run.folder import seal_checkpoint


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint complete, with the fingerprint of the settings that made it, once the
    Trainer and every earlier callback have written it. A rerun resumes only sealed checkpoints of its
    own settings (harness.run.folder); one cut short by a kill while saving has no seal. Register it last.
    Under several processes each writes its own part (its random state, FSDP's optimizer shard): the main
    process seals once all of them have."""

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def on_save(self, args, state, control, **kwargs):
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


def trainer_settings(cfg: RunConfig, targs):
    """The Trainer settings every objective runs with: non-reentrant checkpointing, mixed precision from
    the model's dtype, no pinned memory without a GPU, no search for unused weights under DDP."""
    import torch


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


def _mixed_precision(cfg: RunConfig, targs):
    """Train in the dtype the model is loaded in, unless --bf16/--fp16 was given."""
    import torch


    if targs.bf16 or targs.fp16:
        return targs
    dtype = compute_dtype(cfg.model.dtype)
    if not torch.cuda.is_available() or dtype == torch.float32:
        return targs
    return dataclasses.replace(targs, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16)
