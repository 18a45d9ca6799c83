"""What every objective's Trainer shares: its settings (checkpointing, mixed precision, DDP), the callbacks that
keep the recipes' promises (the step clock, a stop on divergence, sealed checkpoints), training from where a rerun
resumes, and saving the final files."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from harness.errors import RunFailed, raise_if_terminated
from harness.models.loading import compute_dtype
from harness.run.config import RunConfig
from harness.run.distributed import barrier, gather, launched_processes
from harness.run.folder import last_sealed_checkpoint, seal_checkpoint


class SealCheckpoints(TrainerCallback):
    """Marks each checkpoint complete, with the fingerprint of the settings that made it, once the
    Trainer and every earlier callback have written it. A rerun resumes only sealed checkpoints of its
    own settings (harness.run.folder); one cut short by a kill while saving has no seal. Register it last.
    Under several processes each writes its own part (its random state, FSDP's optimizer shard): the main
    process seals once all of them have."""

    def __init__(self, fingerprint: str, divergence: "StopOnDivergence | None" = None):
        self.fingerprint = fingerprint
        self.divergence = divergence

    def on_save(self, args, state, control, **kwargs):
        barrier()
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        diverged = self.divergence is not None and self.divergence.diverged_at is not None
        if state.is_world_process_zero and checkpoint.is_dir() and not diverged:  # NaN weights are never resumed
            seal_checkpoint(checkpoint, self.fingerprint, state.global_step)


# What the Trainer logs that turns NaN or infinite when training diverges (transformers replaces a NaN "loss" by
# the mean of the earlier ones unless --logging_nan_inf_filter false; the gradient norm it logs as it is).
WATCHED_LOGS = ("loss", "grad_norm", "eval_loss")


def weights_finite(model) -> bool:
    """Whether every trainable weight is finite, in every process (FSDP shards them): one sync."""
    checks = [torch.isfinite(p.detach()).all() for p in model.parameters() if p.requires_grad]
    here = bool(torch.stack(checks).all().item()) if checks else True
    return all(gather(here)) if launched_processes() > 1 else here


class StopOnDivergence(TrainerCallback):
    """Stops a run whose weights turned NaN or infinite, before it saves or evaluates them. Cheap: the weights are
    looked at only when a logged loss or gradient norm is not finite (the Trainer has synced for its log anyway) and
    before each checkpoint (saving it syncs anyway), so no checkpoint with such weights is ever written. A gradient
    norm alone is not enough: with fp16 the loss scaler skips a step whose gradients overflowed, and goes on."""

    def __init__(self):
        self.diverged_at: int | None = None
        self.seen: str = ""  # what showed it: "grad_norm nan"

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        bad = [f"{key} {value}" for key, value in (logs or {}).items()
               if key in WATCHED_LOGS and isinstance(value, (int, float)) and not math.isfinite(value)]
        if bad:
            self._check(state, control, model, ", ".join(bad))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:  # set by the Trainer's own flow callback, which runs first
            self._check(state, control, model, "")

    on_epoch_end = on_step_end

    def _check(self, state, control, model, seen: str) -> None:
        if self.diverged_at is None and model is not None and not weights_finite(model):
            self.diverged_at, self.seen = state.global_step, seen
        if self.diverged_at is not None:
            control.should_training_stop = True
            control.should_save = control.should_evaluate = False


class _NothingLeftToTrain(Exception):
    """Raised by _StopBeforeTheFirstStep: the Trainer has loaded the checkpoint and trained nothing."""


class _StopBeforeTheFirstStep(TrainerCallback):
    """When train() calls it, the Trainer has loaded the checkpoint it resumes (weights, its state, FSDP's or
    DeepSpeed's too) and has not run a step: the Trainer's own loop would run one even at max_steps."""

    def on_train_begin(self, args, state, control, **kwargs):
        raise _NothingLeftToTrain


def steps_of(checkpoint: str | None) -> tuple[int, int] | None:
    """(global step, the run's last step) of a checkpoint, from its trainer_state.json; None without one."""
    if checkpoint is None:
        return None
    try:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
        return int(saved["global_step"]), int(saved["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # the Trainer reads it again and says what is wrong


def train_from(trainer, folder):
    """trainer.train, resuming folder.resume_from (a sealed checkpoint of these settings) when there is one.
    Returns the Trainer's outcome, or None when nothing was left to train (see _finish_from).
    A run whose weights turned NaN or infinite fails here (RunFailed), naming the step and its last checkpoint with
    finite weights, instead of saving such weights and calling itself ok."""
    checkpoint = folder.resume_from
    if checkpoint:
        print(f"Resuming from {checkpoint}")
    steps = steps_of(checkpoint)
    if steps is not None and steps[0] >= steps[1]:
        _finish_from(trainer, checkpoint, *steps)
        return None
    outcome = trainer.train(resume_from_checkpoint=checkpoint)
    _fail_if_diverged(trainer, folder)
    return outcome


def _finish_from(trainer, checkpoint: str, step: int, last: int) -> None:
    """A checkpoint at or past the run's last step (a run stopped after saving its last checkpoint, before
    finishing) has nothing left to train: the Trainer loads it, trains no step (its own loop, resumed at max_steps
    in the middle of an epoch, would train one more) and the run finishes from it, its best checkpoint loaded back
    as the Trainer does at the end of training."""
    where = "the run's last" if step == last else f"past the run's last ({last})"
    print(f"{Path(checkpoint).name} is at step {step}, {where}: nothing left to train; finishing the run from it")
    stop = _StopBeforeTheFirstStep()
    trainer.callback_handler.callbacks.insert(0, stop)  # first: no other callback starts anything
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except _NothingLeftToTrain:
        pass
    finally:
        trainer.remove_callback(stop)
    trainer.is_in_train = False
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:
        trainer._load_best_model()
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TrainClock):  # its on_train_end, which the Trainer did not reach
            callback.stopped_by = "max_steps" if trainer.args.max_steps > 0 else "epochs"


def _fail_if_diverged(trainer, folder) -> None:
    guard = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StopOnDivergence)), None)
    if guard is None:
        return
    if guard.diverged_at is None and not weights_finite(trainer.model):  # since the last log or checkpoint
        guard.diverged_at = trainer.state.global_step
    if guard.diverged_at is None:
        return
    good = last_sealed_checkpoint(folder.path, folder.fingerprint)
    kept = f"its last checkpoint with finite weights, {good.name}, is kept" if good else "no checkpoint was kept"
    raise RunFailed(
        f"diverged at step {guard.diverged_at}: the weights became NaN or infinite"
        + (f" ({guard.seen})" if guard.seen else "")
        + f"; {kept}. Lower --learning_rate (or warm up longer) and rerun with --resume false or another --output_dir"
    )


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
        raise_if_terminated()  # a SIGTERM whose exception Python swallowed still stops the run here
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
    """Every run's callbacks: its train clock first, the objective's own (between), the stop on divergence, the
    checkpoint seal last (see SealCheckpoints). Returns the clock too, whose figures go into the record."""
    clock, divergence = TrainClock(cfg.run.budget_seconds, cfg.run.budget_tokens), StopOnDivergence()
    return clock, [clock, *between, divergence, SealCheckpoints(folder.fingerprint, divergence)]


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
