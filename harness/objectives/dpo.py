"""DPO with TRL's DPOTrainer, in the recipe flow (harness.run.flow.train), scored on held-out pairs.

The held-out score is computed pair by pair at the end, in one pass over pairs the run never trained on:
  reward_accuracy / reward_margin  DPO's implicit reward, beta x (log p_policy - log p_reference) summed
                                   over the answer: how often the chosen answer gains more than the rejected
                                   one, and by how much (TRL's rewards/accuracies and rewards/margins). For the
                                   untrained model both are 0 by construction: it is its own reference.
  prefers_chosen                   how often the model gives the chosen answer the higher mean log-probability
                                   per token: the figure the untrained model has too. The reference pass (the
                                   adapter switched off) is the untrained model, so one pass gives both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import DPOConfig

from harness.data.preference import is_conversational
from harness.errors import UserError
from harness.models.loading import print_parameter_counts
from harness.objectives import trl_run
from harness.objectives.protocol import Objective
from harness.reporting.tables import noise_verdict
from harness.run.checks import Bounds, documented_values
from harness.run.record import run_record
from harness.run.training import run_callbacks, save_final, shard_adapters_apart, train_from


@dataclass
class DPOSettings(DPOConfig):
    """TRL's DPOConfig. Its trust_remote_code is the model's (--trust_remote_code, one flag for both)."""

    trust_remote_code: bool = field(default=False, init=False)

    # Checked before any model loads (harness.run.checks.check_trl_settings): DPOTrainer reads these only when it
    # computes the loss, or never refuses them.
    SETTING_VALUES: ClassVar[dict] = {name: documented_values(DPOConfig, name) for name in ("loss_type", "f_divergence_type")}
    SETTING_BOUNDS: ClassVar[dict] = {
        "beta": Bounds(0, low_open=True, why="at 0 every pair has the same loss and nothing is learned; below 0 the "
                                               "rejected answers are learned; TRL's default is 0.1"),
        "label_smoothing": Bounds(0, 0.5, high_open=True, why="the chance a pair's preference is flipped"),
        "ld_alpha": Bounds(0, 1, optional=True),
        "discopop_tau": Bounds(0, low_open=True),
        "ref_model_mixup_alpha": Bounds(0, 1),
        "ref_model_sync_steps": Bounds(1),
    }


def preflight(cfg, output_dir: bool = True):
    work = trl_run.preflight(cfg, output_dir, "dpo")
    if not work.eval_rows:
        raise UserError("DPO is scored on held-out pairs: set --validation_split above 0 or pass --eval_file")
    if cfg.train.max_length not in (None, cfg.data.max_seq_length, _TRL_DEFAULT_MAX_LENGTH):
        raise UserError(f"--max_length is TRL's name for --max_seq_length here; set --max_seq_length "
                        f"{cfg.train.max_length} instead")
    import dataclasses

    targs = dataclasses.replace(cfg.train, max_length=cfg.data.max_seq_length)
    return dataclasses.replace(work, targs=targs)


# TRL's own default: a --max_length nobody set. Read from DPOConfig, so a TRL release that changes it is followed.
_TRL_DEFAULT_MAX_LENGTH = DPOConfig.__dataclass_fields__["max_length"].default


def prepare(cfg, work, tokenizer):
    """The pairs as datasets TRL tokenizes itself, and how long they are in this tokenizer's tokens."""
    from datasets import Dataset


    conversational = is_conversational(work.train_rows)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{cfg.data.data_file} holds conversations but {cfg.model.model}'s tokenizer has no chat "
                        "template: use a chat model, or pairs with a text prompt (TRL's prompt/chosen/rejected)")
    limit = cfg.data.eval_max_samples or len(work.eval_rows)
    eval_rows = work.eval_rows[:limit]
    lengths = [_pair_tokens(tokenizer, pair, conversational) for pair in work.train_rows + eval_rows]
    window = cfg.data.max_seq_length
    n_train = len(work.train_rows)
    dropped = sum(prompt >= window for prompt, _ in lengths[:n_train])
    if dropped == n_train:
        raise UserError(f"every training pair's prompt alone fills --max_seq_length {window}: raise it")
    stats = {
        "train_pairs": len(work.train_rows), "eval_pairs": len(eval_rows),
        "longest_pair_tokens": max(longest for _, longest in lengths),
        "pairs_cut_to_max_seq_length": sum(longest > window for _, longest in lengths),
        # TRL drops a pair whose prompt alone fills the window: no answer token would be left to compare
        "train_pairs_dropped_prompt_too_long": dropped,
        "eval_pairs_dropped_prompt_too_long": sum(prompt >= window for prompt, _ in lengths[n_train:]),
    }
    return _Prepared(Dataset.from_list(work.train_rows), Dataset.from_list(eval_rows), stats)


@dataclass
class _Prepared:
    train: Any  # datasets.Dataset of pairs: TRL tokenizes them
    eval: Any
    stats: dict[str, Any]


def _pair_tokens(tokenizer, pair: dict[str, Any], conversational: bool) -> tuple[int, int]:
    """(prompt tokens, tokens of the longer of prompt + chosen and prompt + rejected)."""
    def count(messages_or_text, generation_prompt=False) -> int:
        text = messages_or_text if not conversational else tokenizer.apply_chat_template(
            messages_or_text, tokenize=False, add_generation_prompt=generation_prompt)
        # verbose=False: a pair longer than the model's window is counted, not warned about (it is cut to fit)
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    prompt = count(pair["prompt"], generation_prompt=True)
    return prompt, max(count(pair["prompt"] + pair[side]) for side in ("chosen", "rejected"))


def train_and_evaluate(cfg, work, tokenizer, prepared, folder, memory) -> dict[str, Any]:
    from trl import DPOTrainer


    targs = trl_run.training_settings(cfg, work.targs)
    model, peft = trl_run.policy_model(cfg, targs)
    clock, callbacks = run_callbacks(cfg, folder)
    trainer = DPOTrainer(model=model, args=targs, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer, peft_config=peft, callbacks=callbacks)
    shard_adapters_apart(trainer)
    counts = print_parameter_counts(trainer.model)
    outcome = train_from(trainer, folder)  # resumes folder.resume_from; nothing when it is at the last step
    scores = score_pairs(trainer, trainer.eval_dataset)
    print(held_out_line(scores, trainer.state.global_step))
    save_final(trainer, tokenizer, folder.staging)
    final_eval = [e for e in trainer.state.log_history if "eval_loss" in e]
    return run_record(cfg, trainer, clock, outcome, counts, folder, work, prepared.stats, planned_steps=None,
                      stopped_by=clock.stopped_by, scores={
                          "eval_loss": final_eval[-1]["eval_loss"] if final_eval else None,
                          "eval": {k: v for k, v in scores.items() if not k.startswith("untrained_")},
                          "before_training": {k.removeprefix("untrained_"): v for k, v in scores.items()
                                              if k.startswith("untrained_")},
                      })


def score_pairs(trainer, dataset) -> dict[str, Any]:
    """Per held-out pair: the policy's and the reference's summed log-probability of each answer (TRL's own
    reference: the adapter switched off, or its frozen copy, or the reference model), then the scores."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    policy, reference, lengths = [], [], []
    try:
        for batch in trainer.get_eval_dataloader(dataset):
            batch = trainer._prepare_inputs(batch)
            with torch.no_grad():
                policy.append(torch.stack(_answer_logps(trainer, model, batch)))
                ref_model = trainer.ref_model if trainer.ref_model is not None else model
                reference.append(torch.stack(trainer.compute_ref_log_probs(ref_model, batch)))
            lengths.append(torch.stack(batch["completion_mask"][..., 1:].sum(dim=1).chunk(2)))
    finally:
        model.train(was_training)
    policy, reference, lengths = (torch.cat(parts, dim=1).float().cpu() for parts in (policy, reference, lengths))
    beta = trainer.beta
    rewards = beta * (policy - reference)  # [2, pairs]: chosen, rejected
    margins = rewards[0] - rewards[1]
    pairs = margins.numel()

    def prefers_chosen(logps) -> float:
        per_token = logps / lengths.clamp(min=1)
        return round((per_token[0] > per_token[1]).float().mean().item(), 4)

    reward_accuracy = round((margins > 0).float().mean().item(), 4)
    after, before = prefers_chosen(policy), prefers_chosen(reference)
    return {
        "pairs": pairs,
        "reward_accuracy": reward_accuracy, "reward_accuracy_se": trl_run.proportion_se(reward_accuracy, pairs),
        "reward_margin": round(margins.mean().item(), 4),
        "prefers_chosen": after, "prefers_chosen_se": trl_run.proportion_se(after, pairs),
        "untrained_prefers_chosen": before, "untrained_prefers_chosen_se": trl_run.proportion_se(before, pairs),
    }


def _answer_logps(trainer, model, inputs):
    """The summed log-probabilities of the answers of a [chosen..., rejected...] batch, as DPOTrainer computes
    them for the reference (compute_ref_log_probs), with the model as it is (adapter on)."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with trainer.accelerator.autocast():
        per_token = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True).log_probs
    per_token = per_token[:, -(inputs["completion_mask"].size(1) - 1):]
    return per_token.sum(dim=1).chunk(2, dim=0)


def held_out_line(scores: dict[str, Any], steps: int) -> str:
    gain = scores["prefers_chosen"] - scores["untrained_prefers_chosen"]
    noise = noise_verdict(gain, scores["prefers_chosen_se"], scores["untrained_prefers_chosen_se"])
    return (f"Held-out pairs ({scores['pairs']}): the model prefers the chosen answer in "
            f"{scores['untrained_prefers_chosen']:.3f} untrained -> {scores['prefers_chosen']:.3f} after {steps} steps "
            f"({gain:+.3f}, {noise}); DPO reward accuracy {scores['reward_accuracy']:.3f}, mean margin "
            f"{scores['reward_margin']:+.4f} (both 0 untrained: the model is its own reference)")


DPO = Objective(preflight, prepare, train_and_evaluate)
