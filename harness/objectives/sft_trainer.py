"""The trainer supervised fine-tuning runs (TRL's SFTTrainer, with SFTConfig as its settings), and the callbacks
that make it do what the recipes promise."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput
from trl import SFTConfig, SFTTrainer

from harness.errors import UserError
from harness.evaluation.scores import ANSWER_METRICS, evaluating
from harness.models.methods import (
    UNPACKABLE_METHODS,
    flattens,
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


def _trl_help(name: str, note: str = "") -> dict:
    return {"help": (note + " " if note else "") + SFTConfig.__dataclass_fields__[name].metadata.get("help", "")}


@dataclass
class SFTSettings(SFTConfig):
    """TRL's SFTConfig: every setting of TRL's SFT (--packing, --padding_free, --completion_only_loss, --loss_type, ...)
    on the command line and in config files. Where TRL's default differs from transformers' TrainingArguments, the
    recipes keep transformers' (the one they were written and measured with), and --max_seq_length stays the window."""

    trust_remote_code: bool = field(default=False, init=False)  # the model's flag (--trust_remote_code) is the one
    learning_rate: float = field(default=5e-5, metadata=_trl_help("learning_rate", "transformers' default, not TRL's 2e-5."))
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Old name of --activation_checkpointing (TRL turns it on by default; here it is off "
                                        "unless the recipe or this flag turns it on)."})
    max_length: int | None = field(
        default=None, metadata={"help": "TRL's name for --max_seq_length, which is the window here: leave unset."})
    # Its --loss_type (TRL's "choices") is checked as it is parsed, from a config file too (harness.run.parsing.
    # CheckedValues); the rest sft_settings checks. No SETTING_BOUNDS (harness.run.checks.check_trl_settings) needed.

    def __post_init__(self):
        # Before TRL's own __post_init__, which warns (a FutureWarning, before our one line) that keep_end is deprecated.
        if self.truncation_mode != "keep_start":
            raise UserError("--truncation_mode does not apply: the recipes cut the free text (a review, an input) to "
                            "fit --max_seq_length, never the instruction or the answer; leave it unset")
        super().__post_init__()


def sft_settings(cfg, targs):
    """The SFTConfig a run trains with, checked before any model loads: --max_seq_length is the window (TRL's
    --max_length must agree), completion-only loss unless --completion_only_loss false, packing and padding-free
    refused where they would mix examples."""
    window = cfg.data.max_seq_length
    if targs.max_length not in (None, window):
        raise UserError(f"--max_length is TRL's name for --max_seq_length here; set --max_seq_length {targs.max_length} instead")
    mixing = flattens(targs) or targs.packing
    if targs.padding_free and not targs.packing and cfg.method.method in UNPACKABLE_METHODS \
            and not cfg.user_set("padding_free"):
        # A recipe's default padding-free meets a method it cannot serve: padded batches, as the user asked nothing.
        print(f"Padding-free: off for {cfg.method.method} (its virtual tokens sit in front of the whole row); "
              "batches padded to their longest instead")
        targs, mixing = dataclasses.replace(targs, padding_free=False), False
    if mixing and cfg.method.method in UNPACKABLE_METHODS:
        flag = "--packing" if targs.packing else "--padding_free"
        raise UserError(f"{flag} would let examples see each other under {cfg.method.method} (its virtual tokens sit in "
                        f"front of the whole packed row): drop {flag} for this method")
    template = targs.chat_template_path
    if template and not (Path(template).is_file() and template.endswith((".jinja", ".j2"))):
        raise UserError(f"--chat_template_path {template}: not a .jinja file that exists; pass a Jinja chat template "
                        "file (copying another model's template with its tokens is not supported here)")
    if targs.packing and targs.packing_strategy == "wrapped":
        raise UserError("--packing_strategy wrapped cuts examples mid-way and lets them attend to each other; use bfd "
                        "(the default) or bfd_split")
    if targs.assistant_only_loss and cfg.data.task != "instruction":
        raise UserError("--assistant_only_loss is for conversations; this run's data are not (classification)")
    return dataclasses.replace(
        targs,
        # Examples are already cut to the window: TRL's own truncation (keep_start) never bites. Padding-free without
        # packing takes no max_length in TRL (it would not enforce it); packing packs rows of up to the window.
        max_length=None if targs.padding_free and not targs.packing else window,
        completion_only_loss=True if targs.completion_only_loss is None else targs.completion_only_loss,
        # Conversations already carry loss on every assistant turn only (harness.data.reading); TRL's flag reads chat
        # datasets it tokenizes itself, which these are not.
        assistant_only_loss=False,
        # A flattened row has no padding and no attention mask: count every token (a pad id equal to EOS would
        # otherwise make the Trainer skip real EOS tokens).
        include_num_input_tokens_seen="all" if flattens(targs) and targs.pad_to_multiple_of is None
        else targs.include_num_input_tokens_seen,
        # Padded batches on a GPU: widths a multiple of 8 suit tensor cores (as before TRL's collator)
        pad_to_multiple_of=8 if targs.pad_to_multiple_of is None and not flattens(targs) and torch.cuda.is_available()
        else targs.pad_to_multiple_of,
    )


def apply_tokenizer_settings(targs, tokenizer) -> None:
    """SFTConfig's --chat_template_path (a .jinja file) and --eos_token, applied to the tokenizer before the data are
    tokenized with it (TRL applies them in SFTTrainer, after; the same again there)."""
    if targs.chat_template_path:
        tokenizer.chat_template = Path(targs.chat_template_path).read_text(encoding="utf-8")
    if targs.eos_token:
        tokenizer.eos_token = targs.eos_token


@torch.no_grad()
def packed_examples_mix(model, vocab_size: int) -> str | None:
    """Why packed examples would see each other in this model, or None when they stay apart: two short random
    sequences run packed in one row (position_ids restarting at 0, no attention mask) must give the logits they
    give alone. transformers builds the block-causal mask from position_ids for its SDPA, eager and flash
    kernels; a model or kernel that ignores position_ids fails here instead of training on mixed examples."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(3, max(vocab_size, 4), (n,), generator=generator) for n in (7, 5))
    packed = torch.cat([first, second])[None].to(device)
    positions = torch.cat([torch.arange(7), torch.arange(5)])[None].to(device)
    with evaluating(model):
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[0, 7:].float()
        alone = model(input_ids=second[None].to(device), use_cache=False).logits[0].float()
    gap = float((together - alone).abs().max())
    if gap <= 1e-3 * max(1.0, float(alone.abs().max())):
        return None
    kernel = getattr(model.config, "_attn_implementation", None) or "default"
    return (f"packed examples would see each other in this {model.config.model_type} model with {kernel} attention "
            f"(an example's logits move by {gap:.3g} when another shares its row)")



class RecipeTrainer(SFTTrainer):
    """TRL's SFTTrainer on data this project tokenized (input_ids + completion_mask: TRL builds the labels, pads,
    packs or flattens), whose evaluation also reports the task's own score (e.g. sentiment accuracy), so it is
    logged next to eval_loss and can select the best checkpoint."""

    def __init__(self, *args, task_scorer: Callable[[Any], dict] | None = None, **kwargs):
        model = kwargs["model"]
        # TRL casts a quantized model's trainable weights to bf16 (the QLoRA paper's choice). The recipes keep them in
        # the dtype PEFT made them (float32), as before: a T4 has no bf16, and fp16 mixed precision needs fp32 masters.
        dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        for name, p in model.named_parameters():
            if name in dtypes and p.dtype != dtypes[name]:
                p.data = p.data.to(dtypes[name])
        self.task_scorer = task_scorer
        self.last_task_metrics: dict[str, Any] = {}
        self._scorer_is_the_loop = False
        # Input positions the model computed while training in this session, padding included: beside the
        # non-padding tokens, what padding cost (a padded batch computes every position of every row).
        self.positions_trained = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.positions_trained += inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)

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
        """TRL's loss, plus AdaLoRA's orthogonality penalty while training. PEFT adds the penalty to the model's own
        loss, which TRL does not use (it sums the log-probabilities of its fused LM head), so it is added here.
        With gradient accumulation TRL normalises the loss over the whole accumulated batch (num_items_in_batch)
        and no longer divides each micro-batch's, so the per-micro-batch penalty is divided by the accumulation
        steps to count once per optimizer step, as configured. Evaluation leaves it out: eval_loss is the
        language-model loss, comparable across methods and across the adapter's resize."""
        with orth_penalty_scaled(self.model, 0.0):  # PEFT's own copy would be computed and thrown away
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not (self.model.training and is_adalora(self.model)):
            return result
        factor = 1 / self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        weight = self.model.peft_config[self.model.active_adapter].orth_reg_weight * factor
        penalty = weight * adalora_orthogonality(self.model)
        return (result[0] + penalty, result[1]) if return_outputs else result + penalty

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        # On the run's own eval set, a scorer that also scores the answers replaces the evaluation loop.
        # For this call only: predict() and an evaluation on another dataset run the Trainer's own loop.
        scorer_is_the_loop = eval_dataset is None and getattr(self.task_scorer, "scores_answers", False)
        self._scorer_is_the_loop = scorer_is_the_loop  # read by evaluation_loop
        try:
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        finally:
            self._scorer_is_the_loop = False
        # TRL's token accuracy on the label tokens (the mean of the eval batches') is this project's answer-token
        # accuracy: same figure, the name earlier records and tables use.
        logged = self.state.log_history[-1] if self.state.log_history else {}
        accuracy = logged.get(f"{metric_key_prefix}_mean_token_accuracy")
        if accuracy is not None and not scorer_is_the_loop:
            logged[f"{metric_key_prefix}_answer_token_accuracy"] = metrics[f"{metric_key_prefix}_answer_token_accuracy"] = accuracy
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


def adalora_orthogonality(model) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty as PEFT's AdaLoraModel.forward computes it: the mean over the adapter's
    lora_A and lora_B of ||P P^T - I||_F (P^T P for B), unweighted."""
    adapter = model.base_model.trainable_adapter_name
    terms = []
    for name, p in model.base_model.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype), p="fro"))
    return torch.stack(terms).mean() if terms else torch.zeros((), device=model.device)


@contextlib.contextmanager
def orth_penalty_scaled(model, factor: float):
    """Scale AdaLoRA's orthogonality penalty, which PEFT adds to the model's own loss in every forward pass (eval
    mode too), for the duration of a block: 0 switches it off."""
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
    """The run's trainer on tokenized data (harness.data.encoding.prepare). evaluation_only (method none): a quantized model
    without an adapter is accepted; the Trainer refuses one because it cannot train, and this one is only ever
    evaluated."""
    from unittest import mock

    import transformers.trainer as hf_trainer
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    if training_args.completion_only_loss is None:  # TRL would guess from column names; these are prompt + answer
        training_args = dataclasses.replace(training_args, completion_only_loss=True)
    accept_quantized = (mock.patch.object(hf_trainer, "validate_quantization_for_training", lambda model: None)
                        if evaluation_only else contextlib.nullcontext())
    bars = is_progress_bar_enabled()
    disable_progress_bar()  # TRL's passes over data already tokenized take no time: their bars are only noise
    try:
        with accept_quantized:
            return RecipeTrainer(
                model=model,
                args=training_args,
                train_dataset=data.train,
                eval_dataset=data.eval,
                processing_class=tokenizer,
                task_scorer=task_scorer,
                callbacks=list(callbacks),
            )
    finally:
        if bars:
            enable_progress_bar()


