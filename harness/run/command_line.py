"""A recipe's command line: its DEFAULTS, a --config file and the flags, parsed into a RunConfig whose training
settings are the recipe objective's class (TRL's SFTConfig, DPOConfig or GRPOConfig)."""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

from trl import TrlParser

from harness.errors import UserError, raise_usage_error
from harness.objectives.registry import training_class
from harness.run.config import ARGUMENT_CLASSES, BASE_TRAINING_DEFAULTS, RunConfig, check_config_file, checked_parse
from harness.run.distributed import start


def parse_args(defaults: dict[str, Any], argv: list[str] | None = None, extra_classes: tuple[type, ...] = ()) -> RunConfig:
    """Parse the command line (and --config file) on top of a recipe's defaults.

    extra_classes: dataclasses of settings only some recipes have (e.g. a judge's), parsed with the
    rest so that they too come from the CLI, a --config file or DEFAULTS; other recipes' --help
    stays free of them. The training settings are the recipe objective's class (TRL's SFTConfig, DPOConfig or
    GRPOConfig, which extend transformers' TrainingArguments)."""
    start()  # under accelerate launch: before the Trainer settings below make accelerate's process state
    objective = defaults.get("objective", "sft")
    parser = TrlParser((*ARGUMENT_CLASSES[:-1], training_class(objective), *extra_classes))
    parser.error = raise_usage_error  # argparse's default prints the ~150-line usage before the message
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
