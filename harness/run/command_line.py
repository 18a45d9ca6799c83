"""A recipe's command line: its DEFAULTS, a --config file and the flags, parsed into a RunConfig whose training
settings are the recipe objective's class (TRL's SFTConfig, DPOConfig or GRPOConfig)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from trl import TrlParser

from harness.errors import UserError, raise_usage_error
from harness.objectives.registry import training_class
from harness.run.config import ARGUMENT_CLASSES, BASE_TRAINING_DEFAULTS, RunConfig
from harness.run.distributed import start
from harness.run.parsing import CheckedValues, check_config_file, checked_parse


class RecipeParser(CheckedValues, TrlParser):
    """TRL's parser (--config files), every value checked as it is parsed (harness.run.parsing.CheckedValues)."""


def parse_args(defaults: dict[str, Any], argv: list[str] | None = None, extra_classes: tuple[type, ...] = ()) -> RunConfig:
    """Parse the command line (and --config file) on top of a recipe's defaults.

    extra_classes: dataclasses of settings only some recipes have (e.g. a judge's), parsed with the
    rest so that they too come from the CLI, a --config file or DEFAULTS; other recipes' --help
    stays free of them. The training settings are the recipe objective's class (TRL's SFTConfig, DPOConfig or
    GRPOConfig, which extend transformers' TrainingArguments)."""
    start()  # under accelerate launch: before the Trainer settings below make accelerate's process state
    objective = defaults.get("objective", "sft")
    parser = RecipeParser((*ARGUMENT_CLASSES[:-1], training_class(objective), *extra_classes))
    parser.error = raise_usage_error  # argparse's default prints the ~150-line usage before the message
    group_help(parser, [*ARGUMENT_CLASSES[:-1], training_class(objective)], extra_classes)
    unknown = parser.set_defaults_with_config(**{**BASE_TRAINING_DEFAULTS, **defaults})
    if unknown:
        raise UserError(f"recipe defaults name unknown settings: {unknown[::2]}")  # a bug in the recipe
    args = list(argv) if argv is not None else sys.argv[1:]
    # TrlParser finds the file only in the two-word form; argparse users also write --config=FILE.
    args = [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    check_config_file(args)
    model, data, method, run, train, *extras = checked_parse(
        lambda: parser.parse_args_and_config(args=args, return_remaining_strings=True))
    if run.objective != objective:
        raise UserError(f"--objective is the recipe's own ({objective}); run a recipe of objective {run.objective} instead "
                        "(the README's recipe table and `ft-cookbook recipes` list them)")
    # Throughput counts the non-padding tokens trained on; the Trainer counts them when asked to.
    train = dataclasses.replace(train, include_num_input_tokens_seen="non_padding")
    if hasattr(train, "trust_remote_code"):  # TRL's configs have their own copy of the model's flag
        train.trust_remote_code = model.trust_remote_code
    return RunConfig(model, data, method, run, train, args, tuple(extras))


# --help in groups, in this order, the most used settings of each first (the rest as their classes list them).
HELP_ORDER = {
    "model": ("model", "quantization", "dtype", "attn_implementation", "backend"),
    "method": ("method", "r", "lora_alpha", "lora_dropout", "target_modules", "init_r", "target_r"),
    "data": ("data_file", "dataset_name", "task", "max_seq_length", "max_samples", "validation_split", "prompt_format"),
    "training": ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "optim", "activation_checkpointing",
                 "padding_free", "packing", "seed"),
    "evaluation": ("eval_strategy", "eval_steps", "eval_on_start", "eval_file", "eval_max_samples",
                   "per_device_eval_batch_size", "load_best_model_at_end", "metric_for_best_model", "forgetting_samples"),
    "run": ("output_dir", "resume", "save_steps", "save_total_limit", "logging_steps", "report_to", "memory_budget_gb",
            "memory_check", "budget_seconds", "init_adapter"),
}
HELP_TITLES = {
    "model": "model: which model, how it is loaded", "method": "method: the PEFT method and its settings",
    "data": "data: what trains, in what window", "training": "training: TRL's and transformers' training settings",
    "evaluation": "evaluation: held-out scores, when and on what", "run": "run: output folder, resume, logging, budgets",
}
_EVALUATION = {"eval_file", "eval_max_samples", "forgetting_file", "forgetting_samples", "load_best_model_at_end",
               "metric_for_best_model", "greater_is_better", "prediction_loss_only", "batch_eval_metrics",
               "include_for_metrics", "per_device_eval_batch_size"}
_RUN = {"output_dir", "overwrite_output_dir", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "save_safetensors", "logging_dir", "logging_strategy", "logging_steps", "logging_first_step",
        "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "report_to", "run_name",
        "disable_tqdm", "resume_from_checkpoint", "push_to_hub"}


def group_help(parser: argparse.ArgumentParser, classes: list[type], extra_classes: tuple[type, ...]) -> None:
    """Lay the flat list of ~170 settings out as --help groups (HELP_ORDER). Only the help changes: parsing reads
    parser._actions, which stay as they are."""
    names = [{f.name for f in dataclasses.fields(cls)} for cls in classes]  # model, data, method, run, training
    home = {}
    for kind, fields in zip(("model", "data", "method", "run", "training"), names):
        for name in fields:
            home[name] = ("evaluation" if name in _EVALUATION or name.startswith("eval_")
                          else "run" if name in _RUN else kind)
    for cls in extra_classes:  # a recipe's own settings (e.g. alpaca100's judge): a group each, named by its class
        for field in dataclasses.fields(cls):
            home[field.name] = cls.__name__
    optionals = parser._optionals  # where HfArgumentParser put every setting
    groups = {kind: parser.add_argument_group(HELP_TITLES[kind]) for kind in HELP_ORDER}
    groups.update({cls.__name__: parser.add_argument_group(f"{cls.__name__}: {(cls.__doc__ or '').strip().splitlines()[0]}")
                   for cls in extra_classes})
    for action in list(optionals._group_actions):
        kind = home.get(action.dest)
        if kind is not None:
            optionals._group_actions.remove(action)
            groups[kind]._group_actions.append(action)
    for kind, first in HELP_ORDER.items():
        rank = {name: i for i, name in enumerate(first)}
        groups[kind]._group_actions.sort(key=lambda action: rank.get(action.dest, len(rank)))  # stable: the rest keep their order
