"""Benchmark sweeps: run recipes x ranks x seeds (x any --set axis) under one fixed budget.

  python -m harness.bench --ranks 4,8,16,32                        # default recipes, real models (GPU + Hub)
  python -m harness.bench --ranks 4,8,16,32 --model stories260k    # offline on CPU, a few minutes
  python -m harness.bench --recipes qwen2_7b_adalora,qwen2_7b_qlora --ranks 8,16 --budget-steps 200 --seeds 1,2,3
  python -m harness.bench --ranks 4,8,16,32 --gpus 0,1,2,3          # four trials at once, one per GPU
  python -m harness.bench --ranks 4,8 --model stories260k --parallel 2   # two at once on the CPU
  python -m harness.bench --ranks 4,8,16,32 --executor ray --ray-address head:6379   # on a Ray cluster
  python -m harness.report                                          # rebuild the tables from results/runs.jsonl

Every trial is one run of `python recipes/<name>.py` in its own process (so its peak memory is
its own, and a crash, out-of-memory or hang ends only that trial), in its own folder
outputs/bench/<sweep>/<trial>/ (run/ holds the recipe's output, trial.log its console output).
Each finished trial appends one line to results/runs.jsonl: the recipe's result.json plus the
sweep's settings, the trial's status (ok / oom / failed / timeout / over-budget, or interrupted
when the sweep itself was stopped), where it ran and a hash of the trial's full config. Rerunning a
command skips the trials already recorded ok, so an interrupted sweep resumes. At the end the tables
(results/<sweep>.md) and plots (results/<sweep>_*.png) are rebuilt from runs.jsonl.

Rank mapping (shown in the tables): LoRA, DoRA, rsLoRA, LoftQ: r = rank. AdaLoRA: target_r = rank
and init_r = 3 x rank, the flagship's ratio (12 -> 4). lora_alpha stays at the recipe's value.
Methods without a rank (full, IA3, prompt/prefix/P-tuning) run once per seed.

One module per concern: grid (the trials and their configs), recipe_file (a recipe's DEFAULTS, read
without running the file), trial (one trial's process and its status), executors (serial, --parallel,
--gpus), ray_executor (--executor ray), sweep (records, resume, the lock that lets one sweep of a name
run at a time, tables), cli (the command line).
"""
import importlib

# Loaded on first use, so that `python -m harness.bench.trial` (run by a Ray worker for every trial)
# imports only what one trial needs.
_EXPORTS = {
    "build_parser": "cli", "main": "cli", "config_hash": "grid", "load_defaults": "grid", "parse_int_list": "grid",
    "plan_trials": "grid", "classify": "trial", "run_trial": "trial",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f"harness.bench.{_EXPORTS[name]}"), name)
