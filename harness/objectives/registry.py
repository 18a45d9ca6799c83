"""Which settings class and which steps each objective has: the one place that knows every objective."""
from __future__ import annotations

from harness.errors import UserError
from harness.objectives import dpo, grpo, sft
from harness.objectives.protocol import Objective
from harness.objectives.sft_trainer import SFTSettings
from harness.run.config import OBJECTIVES

# TRL's SFTConfig, DPOConfig and GRPOConfig, each ours with the project's defaults where they differ.
TRAINING_CLASSES = {"sft": SFTSettings, "dpo": dpo.DPOSettings, "grpo": grpo.GRPOSettings}
STEPS = {"sft": sft.SFT, "dpo": dpo.DPO, "grpo": grpo.GRPO}
assert tuple(TRAINING_CLASSES) == tuple(STEPS) == OBJECTIVES


def training_class(objective: str) -> type:
    """The training-settings dataclass of an objective."""
    if objective not in TRAINING_CLASSES:
        raise UserError(f"unknown objective {objective!r}; one of {', '.join(OBJECTIVES)}")
    return TRAINING_CLASSES[objective]


def all_training_classes() -> tuple[type, ...]:
    return tuple(TRAINING_CLASSES.values())


def objective_of(cfg) -> Objective:
    """The run's Objective (preflight, prepare, train_and_evaluate)."""
    return STEPS[cfg.run.objective]
