"""Every setting's range, checked before any data is read or model loaded.

A value out of range is refused with one line naming the setting, what it must be and what it got.
Combinations that need the data (the AdaLoRA schedule) or the tokenizer (a window too short for
the prompt) are checked where that is known, still before the output folder is touched.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from transformers import AutoConfig

from harness.data.reading import PROMPT_FORMATS
from harness.errors import UserError
from harness.models.backends import check_backend, resolve_backend
from harness.models.loading import DTYPES, check_quantization, hub_warnings_silenced, position_limit, resolve_model
from harness.models.methods import LORA_FAMILY, PROMPT_LEARNING, check_init_adapter, check_method
from harness.run.config import TASKS, RunConfig
from harness.run.distributed import check_launch
from harness.run.folder import check_output_dir

SEED_RANGE = (0, 2**32 - 1)  # numpy's, which transformers' set_seed seeds too


def check_settings(cfg) -> None:
    """Refuse out-of-range values of the run's settings (a RunConfig)."""
    data, method, run, train = cfg.data, cfg.method, cfg.run, cfg.train
    check_method(method, cfg.model.quantization, train.activation_checkpointing)
    _one_of("dtype", cfg.model.dtype, ("auto", *DTYPES))
    _check_attention(cfg.model.attn_implementation)
    _one_of("task", data.task, TASKS[run.objective])
    _one_of("prompt_format", data.prompt_format, PROMPT_FORMATS)

    _at_least("max_samples", data.max_samples, 1, optional=True)
    _at_least("eval_max_samples", data.eval_max_samples, 1, optional=True)
    _at_least("forgetting_samples", data.forgetting_samples, 0)
    _at_least("max_seq_length", data.max_seq_length, 1)
    _between("validation_split", data.validation_split, 0, 1, high_open=True)

    name = method.method
    if name in (*LORA_FAMILY, "adalora"):
        _above("lora_alpha", method.lora_alpha, 0, "the update is scaled by lora_alpha / r: 0 trains an adapter that does nothing")
        _between("lora_dropout", method.lora_dropout, 0, 1, high_open=True)
    if name == "adalora":
        _between("beta1", method.beta1, 0, 1, high_open=True)
        _between("beta2", method.beta2, 0, 1, high_open=True)
        _at_least("orth_reg_weight", method.orth_reg_weight, 0)
    if name in PROMPT_LEARNING:
        _at_least("num_virtual_tokens", method.num_virtual_tokens, 1)
    if name == "p_tuning":
        _at_least("encoder_hidden_size", method.encoder_hidden_size, 1)
    if name == "loftq":
        _one_of("loftq_bits", method.loftq_bits, (2, 4, 8))

    _at_least("per_device_train_batch_size", train.per_device_train_batch_size, 1)
    _at_least("per_device_eval_batch_size", train.per_device_eval_batch_size, 1)
    _at_least("gradient_accumulation_steps", train.gradient_accumulation_steps, 1)
    _above("learning_rate", train.learning_rate, 0, "a learning rate of 0 trains nothing")
    if train.max_steps == 0 or train.max_steps < -1:
        raise UserError(
            f"--max_steps must be a number of optimizer steps >= 1, or -1 to train --num_train_epochs; "
            f"got {train.max_steps}"
        )
    if train.max_steps == -1:
        _above("num_train_epochs", train.num_train_epochs, 0,
               "0 epochs trains nothing; pass a positive number, or --max_steps")
    _at_least("warmup_steps", train.warmup_steps, 0)
    _at_least("weight_decay", train.weight_decay, 0)
    _at_least("max_grad_norm", train.max_grad_norm, 0)
    # torch's AdamW refuses these only when the optimizer is made, after the model loaded
    _between("adam_beta1", train.adam_beta1, 0, 1, high_open=True)
    _between("adam_beta2", train.adam_beta2, 0, 1, high_open=True)
    _at_least("adam_epsilon", train.adam_epsilon, 0)
    for step_setting in ("logging_steps", "save_steps", "eval_steps"):
        _above(step_setting, getattr(train, step_setting), 0, "", optional=True)
    _between("seed", train.seed, *SEED_RANGE)
    if train.data_seed is not None:
        _between("data_seed", train.data_seed, *SEED_RANGE)

    check_trl_settings(train)
    _check_optimizer(train)
    _check_reporting(train.report_to)

    _above("budget_seconds", run.budget_seconds, 0, "", optional=True)
    _at_least("budget_tokens", run.budget_tokens, 1, optional=True)
    _above("memory_budget_gb", run.memory_budget_gb, 0, "", optional=True)


@dataclass(frozen=True)
class Bounds:
    """The range a training setting must be in (low and high: None for unbounded), declared by the settings class
    of an objective (its SETTING_BOUNDS) where TRL does not check it before training, or at all."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""
    optional: bool = False  # None (unset) is allowed


def documented_values(config_class: type, name: str) -> tuple[str, ...]:
    """The values TRL's help for a setting lists ("Possible values are: `'sigmoid'`, ..."; "Supported values are
    'grpo', ..."): for settings TRL's trainer checks only when it computes the loss, long after the model loaded.
    Read from the installed TRL, so that a release adding a value is followed. () where the help lists none."""
    text = config_class.__dataclass_fields__[name].metadata.get("help", "")
    listed = re.search(r"(?:Possible|Supported) values are:?(.*?)(?:\.\s|\.$)", text, re.S)
    return tuple(dict.fromkeys(re.findall(r"[`']+(\w+)[`']+", listed.group(1)))) if listed else ()


def check_trl_settings(train) -> None:
    """The objective's own settings (TRL's SFTConfig, DPOConfig, GRPOConfig), checked the same way for each before any
    model loads: TRL's config already checked itself when it was parsed (its __post_init__); what its trainer would
    refuse only after loading (an unknown --loss_type), or never (--beta 0 in DPO), each settings class declares
    (SETTING_BOUNDS, SETTING_VALUES)."""
    for name, bounds in getattr(type(train), "SETTING_BOUNDS", {}).items():
        _in_bounds(name, getattr(train, name), bounds)
    for name, allowed in getattr(type(train), "SETTING_VALUES", {}).items():
        value = getattr(train, name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if allowed:  # () when the installed TRL's help lists no values: nothing to hold it against
                _one_of(name, item, allowed)


def _in_bounds(setting: str, value: Any, bounds: Bounds) -> None:
    if value is None and bounds.optional:
        return
    number = _number(setting, value)
    low, high = bounds.low, bounds.high
    below = low is not None and (number <= low if bounds.low_open else number < low)
    above = high is not None and (number >= high if bounds.high_open else number > high)
    if not (below or above):
        return
    if low is not None and high is not None:
        wanted = (f"in {'(' if bounds.low_open else '['}{_show(low)}, {_show(high)}{')' if bounds.high_open else ']'}")
    elif low is not None:
        wanted = f"{'greater than' if bounds.low_open else 'at least'} {_show(low)}"
    else:
        wanted = f"{'less than' if bounds.high_open else 'at most'} {_show(high)}"
    raise UserError(f"--{setting} must be {wanted}, got {_show(value)}" + (f" ({bounds.why})" if bounds.why else ""))


def check_window_fits_model(cfg, may_download: bool) -> None:
    """--max_seq_length beyond the positions the model has (its config's max_position_embeddings) would train on
    positions it never learned (RoPE: silently) or index past its position table (learned positions). A model whose
    RoPE scaling stretches its context has no such hard limit: not checked. A window the user asked for is refused;
    the recipe's own window (written for the recipe's model, larger than a --model given instead) is cut to the
    model's limit, in one line."""
    limit = _position_limit(cfg.model, may_download)
    window = cfg.data.max_seq_length
    if limit is None or window <= limit:
        return
    if cfg.user_set("max_seq_length"):
        raise UserError(f"--max_seq_length {window} is beyond the {limit} positions {cfg.model.model} has "
                        f"(max_position_embeddings in its config): pass --max_seq_length {limit} or less")
    print(f"Window: the recipe's --max_seq_length {window} is beyond the {limit} positions {cfg.model.model} has; "
          f"using {limit}")
    cfg.data.max_seq_length = limit


def _position_limit(model_args, may_download: bool) -> int | None:
    """The model's position limit (harness.models.loading.position_limit) from its config alone (no weights; from the
    Hub only config.json, and only when may_download), or None: none stated, RoPE-scaled, or the config cannot be
    read here (then the load reports why in its own words). Code shipped with a model is not run for this."""
    try:
        source = resolve_model(model_args.model)
        with hub_warnings_silenced():
            config = AutoConfig.from_pretrained(source, trust_remote_code=False, local_files_only=not may_download)
    except Exception:  # noqa: BLE001 - unknown here is not wrong: the model's load decides
        return None
    return position_limit(config.get_text_config() if hasattr(config, "get_text_config") else config)


ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _check_attention(name: str | None) -> None:
    """transformers fails on these only while loading the model (after the folder is claimed)."""
    import importlib.util

    import torch

    if name is None or "/" in name:  # unset, or a kernel from the Hub ("kernels-community/...")
        return
    _one_of("attn_implementation", name, ATTENTION_IMPLEMENTATIONS)
    if name.startswith("flash_attention"):
        package = "flash_attn" if name == "flash_attention_2" else "flash_attn_interface"
        if not torch.cuda.is_available() or importlib.util.find_spec(package) is None:
            raise UserError(
                f"--attn_implementation {name} needs an NVIDIA GPU and the {package} package; "
                "use sdpa (the default) or eager"
            )


def _check_optimizer(train) -> None:
    """transformers finds a missing optimizer package (torchao, galore, ...) only when training starts."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(train)
    except (ImportError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        name = getattr(train.optim, "value", train.optim)
        raise UserError(f"--optim {name} cannot be used here ({reason}); pick another --optim, e.g. adamw_torch") from None


def _check_reporting(report_to: Any) -> None:
    """--report_to wandb without wandb installed fails only when the Trainer is built."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in INTEGRATION_TO_CALLBACK:
            raise UserError(f"unknown --report_to {name!r}; use none or one of {', '.join(INTEGRATION_TO_CALLBACK)}")
        if name not in get_available_reporting_integrations():
            raise UserError(f"--report_to {name} needs its package installed (pip install {name}); or --report_to none")


def _number(setting: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise UserError(f"--{setting} must be a number, got {value!r}")
    return value


def _at_least(setting: str, value: Any, minimum: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if _number(setting, value) < minimum:
        raise UserError(f"--{setting} must be at least {_show(minimum)}, got {_show(value)}")


def _above(setting: str, value: Any, bound: float, why: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if _number(setting, value) <= bound:
        raise UserError(f"--{setting} must be greater than {_show(bound)}, got {_show(value)}" + (f" ({why})" if why else ""))


def _between(setting: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    number = _number(setting, value)
    if number < low or number > high or (high_open and number == high):
        bracket = ")" if high_open else "]"
        raise UserError(f"--{setting} must be in [{_show(low)}, {_show(high)}{bracket}, got {_show(value)}")


def _show(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _one_of(setting: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"unknown --{setting} {value!r}; use {', '.join(map(str, allowed))}")


def common_checks(cfg: RunConfig, output_dir: bool) -> None:
    """The checks every objective makes first: ranges, method / backend / quantization, output_dir."""
    check_settings(cfg)
    cfg.model.backend = resolve_backend(cfg.model.backend, cfg.method.method)  # result.json says which ran
    check_backend(cfg.model.backend, cfg.method.method, cfg.model.quantization)
    check_init_adapter(cfg.run.init_adapter, cfg.method)
    check_quantization(cfg.model)
    check_launch(cfg)
    # A real run reads the model's config.json from the Hub next anyway (memory plan, layer names); harness.bench's
    # planning (output_dir=False) stays off the network: its trial checks again when it runs.
    check_window_fits_model(cfg, may_download=output_dir)
    if output_dir:
        check_output_dir(cfg)
