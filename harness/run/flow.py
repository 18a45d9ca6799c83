"""The flow every recipe runs: check, claim output_dir, load, adapt, train, evaluate, save, record.

A recipe is a name plus a dict of defaults; `run_recipe` parses the command line and config file on top of them
and runs `train`. Everything that can be refused without a model (the objective's preflight, then the
tokenizer-dependent checks) is refused before output_dir is touched; harness.run.folder decides what a rerun
into an existing output_dir does. What differs between SFT, DPO and GRPO is the objective's
(harness.objectives); the record is harness.run.record's.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

from transformers import set_seed

from harness.errors import reported_as_one_line
from harness.evaluation import progress
from harness.locations import RECIPES_DIR
from harness.models.loading import load_tokenizer
from harness.models.methods import check_targets
from harness.objectives.protocol import Workload
from harness.objectives.registry import objective_of
from harness.plan.preflight import check_memory_plan, time_from_data
from harness.run.command_line import parse_args
from harness.run.config import RunConfig
from harness.run.distributed import is_main, main_speaks
from harness.run.folder import RESULT_FILE, claimed
from harness.run.measure import PeakMemory, apply_memory_budget
from harness.run.record import RunStart, recorded_run

INTERRUPTED_NOTE = (
    "the run's record says so and its checkpoints are kept: rerun the same command to resume from the last one"
)


def run_recipe(name: str, defaults: dict[str, Any], argv: list[str] | None = None,
               reward_funcs: tuple = ()) -> dict[str, Any]:
    """Entry point of every recipe script. reward_funcs: a GRPO recipe's reward functions (TRL's signature)."""
    with reported_as_one_line(name, INTERRUPTED_NOTE), main_speaks():  # under accelerate launch: one voice
        config = parse_args({**defaults, "recipe": name}, argv)
        return train(dataclasses.replace(config, reward_funcs=tuple(reward_funcs)))


def load_recipe(recipe: str | Path):
    """A recipe script as a module (its DEFAULTS, a GRPO recipe's reward functions), without running it: the
    name of a script in recipes/, or a script's path."""
    script = Path(recipe) if str(recipe).endswith(".py") else RECIPES_DIR / f"{recipe}.py"
    spec = importlib.util.spec_from_file_location(f"recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preflight(cfg: RunConfig, output_dir: bool = True) -> Workload:
    """Everything that can be refused without loading a model or tokenizer: every setting's range, the
    method / backend / quantization combination, what is in output_dir (unless output_dir=False), the
    data, the AdaLoRA schedule. harness.bench calls it for every planned trial, so a sweep never starts
    a trial its recipe would refuse."""
    return objective_of(cfg).preflight(cfg, output_dir)


def train(cfg: RunConfig) -> dict[str, Any]:
    objective = objective_of(cfg)
    start = RunStart.now()
    work = objective.preflight(cfg, True)
    progress.configure(disable=bool(work.targs.disable_tqdm) or not is_main())  # the Trainer's own rule
    for line in work.left_out_lines():
        print(f"Data: {line}")
    memory_plan = check_memory_plan(cfg, work.targs, work)  # before anything is downloaded or loaded
    tokenizer = load_tokenizer(cfg.model)
    check_targets(cfg.method, cfg.model, cfg.run.init_adapter)  # layer names, before any weights load
    prepared = objective.prepare(cfg, work, tokenizer)
    print(f"Data: {json.dumps(prepared.stats)}")
    time_from_data(cfg, work.targs, prepared, memory_plan)  # SFT: the time again, from the rows' real lengths

    with claimed(cfg) as folder:  # from here on output_dir is this run's (see harness.run.folder)
        if folder.finished is not None:
            print(
                f"{folder.path} already holds this run, finished (status ok, started {folder.finished.get('started_at')}): "
                "nothing to do. --resume false trains it again (the finished files are replaced only when the new "
                "run finishes); another --output_dir keeps both."
            )
            return folder.finished
        set_seed(work.targs.seed)
        memory_budget = apply_memory_budget(cfg.run.memory_budget_gb)  # before CUDA allocates anything
        memory = PeakMemory()
        with recorded_run(folder, cfg, start, memory, {**memory_budget, "memory_plan": memory_plan}) as record:
            record.update(objective.train_and_evaluate(cfg, work, tokenizer, prepared, folder, memory))
    print(f"\nResult written to {folder.path / RESULT_FILE}")
    return record
