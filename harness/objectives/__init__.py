"""What a run optimises, beside supervised fine-tuning (harness.recipe): preference pairs with TRL's
DPOTrainer (dpo.py, data in preference.py) and reward functions with TRL's GRPOTrainer (grpo.py, GSM8K
in gsm8k.py). Each objective's run shares the recipe flow (harness.recipe.train: checks, memory plan,
output folder, record); what differs is its data, its trainer and how it is scored (trl_run.py holds
what the two TRL objectives share).
"""
from __future__ import annotations

OBJECTIVES = ("sft", "dpo", "grpo")
# The --task each objective's data is read as (harness.data.load_records).
TASKS = {"sft": ("classification", "instruction"), "dpo": ("preference",), "grpo": ("math",)}


def training_class(objective: str):
    """The training-settings dataclass of an objective: TRL's SFTConfig, DPOConfig or GRPOConfig (ours, with the
    project's defaults where they differ)."""
    from harness.errors import UserError

    if objective == "sft":
        from harness.training import SFTSettings

        return SFTSettings
    if objective == "dpo":
        from harness.objectives.dpo import DPOSettings

        return DPOSettings
    if objective == "grpo":
        from harness.objectives.grpo import GRPOSettings

        return GRPOSettings
    raise UserError(f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")


def all_training_classes() -> tuple[type, ...]:
    return tuple(training_class(name) for name in OBJECTIVES)


def objective_of(cfg):
    """The run's Objective (preflight, prepare, train_and_evaluate)."""
    if cfg.run.objective == "dpo":
        from harness.objectives.dpo import DPO

        return DPO
    if cfg.run.objective == "grpo":
        from harness.objectives.grpo import GRPO

        return GRPO
    from harness.recipe import SFT

    return SFT
