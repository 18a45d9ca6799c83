"""The command line of `python -m harness.bench` (see harness/bench/__init__.py for what it does)."""
from __future__ import annotations

import argparse
import sys

from harness.bench.grid import (
    ADALORA_INIT_FACTOR,
    DEFAULT_RECIPES,
    OFFLINE_BUDGET_STEPS,
    OFFLINE_CPU_THREADS,
    OFFLINE_SETTINGS,
)
from harness.bench.ray_executor import DEFAULT_CONNECT_TIMEOUT_S
from harness.bench.sweep import run_sweep
from harness.errors import OneLineArgumentParser, reported_as_one_line
from harness.locations import OUTPUTS_DIR, RESULTS_DIR
from harness.models.offline import OFFLINE_MODELS


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="python -m harness.bench",
        description=(
            "Sweep recipes x ranks x seeds (x --set axes) under one fixed budget, each trial in its own "
            "process; append one record per trial to <results-dir>/runs.jsonl and write the tables "
            "<results-dir>/<name>.md and plots <results-dir>/<name>_*.png."
        ),
        epilog=(
            "Rank mapping: LoRA/DoRA/rsLoRA/LoftQ r = rank; AdaLoRA target_r = rank, init_r = "
            f"{ADALORA_INIT_FACTOR} x rank (the flagship's 12 -> 4). Methods without a rank run once per seed. "
            "Trial status: ok, oom, failed, timeout, over-budget (needed more memory than --memory-budget-gb), "
            "interrupted (the sweep was stopped). Exit code 0 when every trial is ok, 1 otherwise."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--recipes", default=",".join(DEFAULT_RECIPES),
        help="Comma-separated recipe names (files in recipes/, without .py) or paths to recipe files.",
    )
    parser.add_argument(
        "--ranks", default=None,
        help="Comma-separated adapter ranks, e.g. 4,8,16,32 (see the rank mapping below). "
             "Unset: every recipe keeps its own rank.",
    )
    parser.add_argument("--seeds", default="42", help="Comma-separated training seeds; several give mean +- std.")
    parser.add_argument(
        "--model", default=None,
        help="Run every recipe on this model instead of its own (Hub id, local folder, or an offline "
             f"model: {', '.join(OFFLINE_MODELS)}).",
    )
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
        help="Any recipe setting, one value (fixed for every trial) or several (a sweep axis). Repeatable. "
             "Values holding commas are separated by ';' instead: --set 'target_modules=q_proj,v_proj;all7'.",
    )
    budget = parser.add_argument_group(
        "budgets (identical for every trial; whichever is hit first stops training, the record says which)"
    )
    budget.add_argument(
        "--budget-steps", type=int, default=None,
        help=f"Optimizer steps per trial (the recipe's --max_steps). With an offline model and no budget "
             f"given: {OFFLINE_BUDGET_STEPS}, plus "
             + ", ".join(f"--set {k}={v}" for k, v in OFFLINE_SETTINGS.items()) + " unless set.",
    )
    budget.add_argument("--budget-seconds", type=float, default=None, help="Seconds of training (evaluation excluded).")
    budget.add_argument("--budget-tokens", type=int, default=None, help="Non-padding tokens trained on.")
    budget.add_argument(
        "--memory-budget-gb", type=float, default=None,
        help="Memory cap per trial in GiB, e.g. 16 to emulate a T4 on a bigger GPU. CUDA: enforced through the "
             "allocator's per-process memory fraction (the CUDA context and paged-optimizer memory are outside "
             "it); an OOM at the cap is recorded as over-budget. CPU: not enforced, checked after the run "
             "against the trial's peak RSS.",
    )
    budget.add_argument(
        "--cpu-threads", type=int, default=None,
        help=f"CPU threads per trial (OMP_NUM_THREADS / MKL_NUM_THREADS of the trial process). Unset: "
             f"torch's default; {OFFLINE_CPU_THREADS} with an offline model, --parallel or --executor ray.",
    )
    budget.add_argument(
        "--trial-timeout", type=float, default=None,
        help="Wall-clock seconds after which a trial is killed and recorded as timeout. "
             "Unset: 21600 (6 h: a full 3-epoch 7B run on a T4 takes hours), or 600 with an offline model.",
    )
    run = parser.add_argument_group(
        "where trials run (each in its own process, with the same timeouts and records whichever runs it)"
    )
    run.add_argument(
        "--parallel", type=int, default=None, metavar="N",
        help="Run N trials at once on this machine's CPU (GPUs hidden from them), one CPU thread each unless "
             "--cpu-threads says otherwise. With --executor ray: at most N tasks outstanding. Unset: one trial "
             "at a time (every device visible), or as many as the Ray cluster can run at once.",
    )
    run.add_argument(
        "--gpus", default=None, metavar="0,1,..",
        help="Run trials concurrently, one per GPU listed (nvidia-smi's numbers), each seeing only its own GPU "
             "(CUDA_VISIBLE_DEVICES); list a GPU twice to run two trials on it. The table says which GPU ran each.",
    )
    run.add_argument(
        "--executor", choices=("local", "ray"), default="local",
        help="local: this machine. ray: every trial a Ray task (needs `pip install -e .[ray]`); "
             "every Ray node needs the project at the same path, records come back here.",
    )
    run.add_argument(
        "--ray-address", default=None,
        help="The Ray cluster to use, e.g. head:6379 or ray://head:10001 ('local': a new Ray on this machine). "
             "Unset: RAY_ADDRESS, else the cluster `ray start` began on this machine, else a new local Ray.",
    )
    run.add_argument(
        "--ray-connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT_S, metavar="SECONDS",
        help="How long to wait for the Ray cluster to accept this sweep before giving up in one line "
             "(a new local Ray is not bounded by it).",
    )
    run.add_argument(
        "--ray-resources", default=None, metavar="NAME=N,..",
        help="What each trial's task asks of Ray, e.g. num_gpus=1,num_cpus=8 (other names are custom resources). "
             "Unset: num_gpus=1 when the cluster has GPUs, and --cpu-threads CPUs.",
    )
    where = parser.add_argument_group("where things go")
    where.add_argument(
        "--name", default=None,
        help="Sweep name: the table is <results-dir>/<name>.md. Unset: the --model name, or 'default-models'.",
    )
    where.add_argument("--results-dir", default=str(RESULTS_DIR), help="Where runs.jsonl, tables and plots go.")
    where.add_argument(
        "--output-root", default=str(OUTPUTS_DIR / "bench"),
        help="Trial folders go to <output-root>/<name>/<trial>/ (adapters, checkpoints, trial.log).",
    )
    parser.add_argument(
        "--no-baseline", dest="baseline", action="store_false",
        help="Leave out the baseline trials: by default the untrained model (method none) is scored once on "
             "every distinct eval set, model and quantization of the sweep, and heads its tables.",
    )
    parser.add_argument("--force", action="store_true", help="Rerun trials already recorded ok.")
    parser.add_argument("--dry-run", action="store_true", help="List the trials and exit without running them.")
    parser.add_argument("--quiet", action="store_true", help="Keep the trials' own output (progress bars) in trial.log only.")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # SIGTERM (a scheduler, `kill`) stops the sweep as Ctrl-C does (reported_as_one_line turns it into
    # a KeyboardInterrupt): the running trial is recorded as interrupted.
    with reported_as_one_line("bench"):
        return run_sweep(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
