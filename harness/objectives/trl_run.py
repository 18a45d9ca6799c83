"""What the DPO and GRPO runs share: their checks, the policy model they hand to TRL's trainer, the standard
error of their held-out proportions."""
from __future__ import annotations

from harness.data import reading as data_mod
from harness.errors import UserError
from harness.evaluation.scores import accuracy_standard_error
from harness.models.backends import unsloth_model
from harness.models.loading import load_model, resolve_model
from harness.models.methods import initialise_loftq, load_adapter_weights, peft_config
from harness.objectives.protocol import Workload
from harness.run.checks import common_checks
from harness.run.training import trainer_settings

# Methods TRL's trainers train here. AdaLoRA's rank allocation and the prompt-learning methods are wired
# into the SFT trainer only; method none (the untrained model) is what every DPO and GRPO run scores first.
TRL_METHODS = ("lora", "dora", "rslora", "loftq", "ia3", "full")


def preflight(cfg, output_dir: bool, objective: str):
    """The shared checks and the data, read and split as an SFT run's is (harness.data.reading); returns a Workload."""
    if cfg.method.method not in TRL_METHODS:
        raise UserError(
            f"the {objective} recipes train {', '.join(TRL_METHODS)}, not {cfg.method.method}"
            + (" (every run scores the untrained model before training: that is its baseline)"
               if cfg.method.method == "none" else "")
        )
    common_checks(cfg, output_dir)
    loaded, eval_loaded = data_mod.load_records(cfg.data), data_mod.load_eval_records(cfg.data)
    train_rows, eval_rows = data_mod.split_records(loaded.rows, cfg.data, eval_loaded)
    return Workload(loaded, eval_loaded, train_rows, eval_rows, cfg.train, schedule=None)


def training_settings(cfg, targs):
    """The Trainer settings every recipe runs with (harness.run.flow.trainer_settings), and TRL's copy of the
    model's trust_remote_code flag."""
    targs = trainer_settings(cfg, targs)
    targs.trust_remote_code = cfg.model.trust_remote_code  # not an init field of ours: a copy resets it
    return targs


def policy_model(cfg, targs):
    """(model, peft_config) for TRL's trainer. A fresh adapter goes in as a peft_config, so TRL's reference is
    the base with the adapter switched off (no second copy); with --init_adapter the model comes with that
    adapter loaded, and TRL keeps a frozen copy of it as the reference (the model DPO starts from)."""
    import warnings

    from peft import get_peft_model


    # TRL 1.16 still reads the Trainer's old checkpointing name around every reference and generation pass.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
    if cfg.model.backend == "unsloth":

        model = unsloth_model(cfg.model, cfg.method, cfg.data.max_seq_length, targs.activation_checkpointing, targs.seed)
        return model, None
    model = load_model(cfg.model, cfg.method.method, targs.activation_checkpointing)
    config = peft_config(cfg.method, model, None)
    if config is None or not (cfg.run.init_adapter or cfg.method.method == "loftq"):
        return model, config
    model = get_peft_model(model, config)
    if cfg.method.method == "loftq" and cfg.model.quantization == "4bit":
        initialise_loftq(model, resolve_model(cfg.model.model))
    if cfg.run.init_adapter:
        load_adapter_weights(model, cfg.run.init_adapter)
    return model, None


def proportion_se(p: float, n: int) -> float | None:
    """Standard error of a proportion over n items (None for fewer than two)."""
    return round(accuracy_standard_error(p, n), 4) if n > 1 else None
