"""Benchmark sweeps: run recipes x ranks x seeds (x any --set axis) under one fixed budget.

  python -m harness.bench --ranks 4,8,16,32                        # default recipes, real models (GPU + Hub)
  python -m harness.bench --ranks 4,8,16,32 --model stories260k    # offline on CPU, a few minutes
  python -m harness.bench --recipes qwen2_7b_adalora,qwen2_7b_qlora --ranks 8,16 --budget-steps 200 --seeds 1,2,3
  python -m harness.report                                          # rebuild the tables from results/runs.jsonl

Every trial is one run of `python recipes/<name>.py` in its own process (so its peak memory is
its own, and a crash, out-of-memory or hang ends only that trial), in its own folder
outputs/bench/<sweep>/<trial>/ (run/ holds the recipe's output, trial.log its console output).
Each finished trial appends one line to results/runs.jsonl: the recipe's result.json plus the
sweep's settings, the trial's status (ok / oom / failed / timeout / over-budget, or interrupted
when the sweep itself was stopped) and a hash of the trial's full config. Rerunning a command
skips the trials already recorded ok, so an interrupted sweep resumes. At the end the tables
(results/<sweep>.md) and plots (results/<sweep>_*.png) are rebuilt from runs.jsonl.

Rank mapping (shown in the tables): LoRA, DoRA, rsLoRA, LoftQ: r = rank. AdaLoRA: target_r = rank
and init_r = 3 x rank, the flagship's ratio (12 -> 4). lora_alpha stays at the recipe's value.
Methods without a rank (full, IA3, prompt/prefix/P-tuning) run once per seed.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime as dt
import difflib
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.config import REPO_ROOT
from harness.errors import EXIT_INTERRUPTED, EXIT_OOM, OneLineArgumentParser, UserError, reported_as_one_line
from harness.measure import peak_rss_mb
from harness.records import LOCATION_SETTINGS, RUNS_FILE, append_record, read_records

RECIPES_DIR = REPO_ROOT / "recipes"
DEFAULT_RECIPES = ("qwen2_7b_adalora", "qwen2_7b_qlora")
ADALORA_INIT_FACTOR = 3  # init_r = 3 x target_r, as the flagship's 12 -> 4
RANKED_METHODS = ("lora", "dora", "rslora", "loftq", "adalora")
RANK_FLAGS = ("r", "init_r", "target_r")

# Without a budget, an offline model would run the recipe's full 3 epochs (~15 min a trial on a
# 2-core CPU). These keep the README's offline sweep to a few minutes (~40 s a trial); they are
# applied to every trial alike and recorded in each trial's config, so the tables show them.
OFFLINE_BUDGET_STEPS = 16
OFFLINE_SETTINGS = {"max_samples": "160", "max_seq_length": "128"}
# A 260K-parameter model gains nothing from a second thread, and threads fighting over shared cores
# made steps ~6x slower on the 2-core development machine; one thread per trial keeps timings stable.
OFFLINE_CPU_THREADS = 1

# Settings the sweep itself sets; --set on them would silently fight the sweep's own options.
OWNED_SETTINGS = {
    "output_dir": "the sweep gives every trial its own folder (see --output-root)",
    "seed": "use --seeds",
    "max_steps": "use --budget-steps",
    "budget_seconds": "use --budget-seconds",
    "budget_tokens": "use --budget-tokens",
    "memory_budget_gb": "use --memory-budget-gb",
    "recipe": "use --recipes",
}

STATUS_OK = "ok"


@dataclass
class Trial:
    recipe: str
    script: Path
    method: str
    model: str
    rank: int | None
    seed: int
    axes: dict[str, str]  # the --set values of this trial
    argv: list[str]  # recipe flags, output_dir excepted
    config_hash: str = ""
    trial_id: str = ""
    rank_setting: dict[str, int] = field(default_factory=dict)
    scored_on: str = ""  # what its scores depend on besides training (model, quantization, eval data)
    objective: str = "sft"  # dpo and grpo runs score their untrained model themselves: no baseline trial


# ---------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    from harness.offline_models import OFFLINE_MODELS

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
             f"torch's default, or {OFFLINE_CPU_THREADS} with an offline model.",
    )
    budget.add_argument(
        "--trial-timeout", type=float, default=None,
        help="Wall-clock seconds after which a trial is killed and recorded as timeout. "
             "Unset: 21600 (6 h: a full 3-epoch 7B run on a T4 takes hours), or 600 with an offline model.",
    )
    where = parser.add_argument_group("where things go")
    where.add_argument(
        "--name", default=None,
        help="Sweep name: the table is <results-dir>/<name>.md. Unset: the --model name, or 'default-models'.",
    )
    where.add_argument("--results-dir", default=str(REPO_ROOT / "results"), help="Where runs.jsonl, tables and plots go.")
    where.add_argument(
        "--output-root", default=str(REPO_ROOT / "outputs" / "bench"),
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


def parse_int_list(text: str, option: str, minimum: int) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not re.fullmatch(r"[+-]?\d+", item):
            raise UserError(f"{option}: {item!r} is not a whole number; give comma-separated integers like 4,8,16")
        value = int(item)
        if value < minimum:
            raise UserError(f"{option}: {value} is below {minimum}; every value must be at least {minimum}")
        if value not in values:
            values.append(value)
    return values


def setting_names() -> set[str]:
    """Every setting a single training run has (what --set may name and a recipe's DEFAULTS may hold)."""
    from harness.config import ARGUMENT_CLASSES
    from harness.objectives import all_training_classes

    classes = (*ARGUMENT_CLASSES, *all_training_classes())  # DPO's and GRPO's recipes have TRL's settings too
    return {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    known = setting_names()
    axes: dict[str, list[str]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not raw.strip():
            raise UserError(f"--set {item!r}: write it as KEY=VALUE or KEY=VALUE1,VALUE2")
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UserError(
                f"--set {key}: no recipe has a setting named {key!r}{hint}; "
                "`python recipes/qwen2_7b_adalora.py --help` lists them all"
            )
        if key in OWNED_SETTINGS:
            raise UserError(f"--set {key}: the sweep sets {key} itself; {OWNED_SETTINGS[key]}")
        values = [v.strip() for v in raw.split(";" if ";" in raw else ",") if v.strip()]
        axes.setdefault(key, [])
        axes[key] += [v for v in values if v not in axes[key]]
    return axes


def known_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.py")) if not p.stem.startswith("_")}


def resolve_recipes(text: str) -> list[tuple[str, Path]]:
    known = known_recipes()
    chosen = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if item.endswith(".py"):
            path = Path(item).expanduser()
            if not path.is_file():
                raise UserError(f"--recipes: recipe file {item} not found")
            chosen.append((path.stem, path.resolve()))
        elif item in known:
            chosen.append((item, known[item]))
        else:
            raise UserError(f"--recipes: unknown recipe {item!r}; known: {', '.join(known) or '(none in recipes/)'}")
    if not chosen:
        raise UserError("--recipes: name at least one recipe")
    return chosen


def load_defaults(name: str, script: Path) -> dict[str, Any]:
    from harness.recipe import load_recipe

    try:
        module = load_recipe(script)
    except Exception as exc:
        raise UserError(f"recipe {script} cannot be imported ({type(exc).__name__}: {exc})") from None
    defaults = getattr(module, "DEFAULTS", None)
    if not isinstance(defaults, dict):
        raise UserError(f"recipe {script} has no DEFAULTS dict; is it a recipe of this project?")
    own = sorted(set(defaults) - setting_names())
    if own:
        raise UserError(
            f"recipe {name} has settings no training run has ({', '.join(own[:4])}{', ...' if len(own) > 4 else ''}): "
            "it is a flow of several runs, which harness.bench cannot sweep; run it directly"
        )
    return defaults


def check_writable(folder: Path, option: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".bench-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"{option} {folder} is not writable ({exc.strerror}); pass a folder you can write to") from None


def model_hidden_size(model: str) -> int | None:
    """The model's hidden size, read from its config without downloading anything (None if unknown)."""
    from transformers import AutoConfig

    from harness.models import resolve_model

    try:
        source = resolve_model(model)
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except UserError:
        raise
    except Exception:  # not cached / needs remote code: the trial itself will report what is wrong
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


# ---------------------------------------------------------------------------- planning

def plan_trials(args: argparse.Namespace) -> list[Trial]:
    from harness.config import parse_args

    recipes = resolve_recipes(args.recipes)
    ranks = parse_int_list(args.ranks, "--ranks", 1) if args.ranks is not None else [None]
    seeds = parse_int_list(args.seeds, "--seeds", 0)
    axes = parse_sets(args.sets)
    if args.ranks is not None:
        for key in RANK_FLAGS:
            if key in axes:
                raise UserError(f"--set {key}: --ranks sets {', '.join(RANK_FLAGS)}; drop one of the two")
    if args.model is not None and "model" in axes:
        raise UserError("--set model and --model both choose the model; use one")
    for option in ("budget_steps", "budget_tokens"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UserError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.budget_seconds is not None and args.budget_seconds <= 0:
        raise UserError(f"--budget-seconds must be positive, got {args.budget_seconds}")
    if args.memory_budget_gb is not None and args.memory_budget_gb <= 0:
        raise UserError(f"--memory-budget-gb must be positive, got {args.memory_budget_gb}")

    fixed: dict[str, str] = {}
    if args.model is not None:
        fixed["model"] = args.model
    if args.budget_steps is not None:
        fixed["max_steps"] = str(args.budget_steps)
    if args.budget_seconds is not None:
        fixed["budget_seconds"] = str(args.budget_seconds)
    if args.budget_tokens is not None:
        fixed["budget_tokens"] = str(args.budget_tokens)
    if args.memory_budget_gb is not None:
        fixed["memory_budget_gb"] = str(args.memory_budget_gb)
    if "data_seed" not in axes:
        fixed["data_seed"] = "42"  # same data order for every trial, whatever its training seed

    axis_names = list(axes)
    combos = [dict(zip(axis_names, values)) for values in itertools.product(*axes.values())] or [{}]
    varying = [k for k in axis_names if len(axes[k]) > 1]
    hidden_sizes: dict[str, int | None] = {}
    trials: list[Trial] = []
    recipe_defaults: dict[str, dict[str, Any]] = {}
    for name, script in recipes:
        defaults = recipe_defaults[name] = load_defaults(name, script)
        for combo in combos:
            base_flags = {**fixed, **combo}
            base = _parse(parse_args, defaults, name, _flags(base_flags))
            method, model = base.method.method, base.model.model
            if model not in hidden_sizes:
                hidden_sizes[model] = model_hidden_size(model)
            recipe_ranks = ranks
            if args.ranks is None and method in RANKED_METHODS:
                recipe_ranks = [base.method.target_r if method == "adalora" else base.method.r]  # shown, not passed
            elif args.ranks is not None and method not in RANKED_METHODS:
                if combo is combos[0]:
                    print(f"{name}: method {method} has no rank; it runs once per seed", flush=True)
                recipe_ranks = [None]
            for rank in recipe_ranks:
                rank_setting = rank_settings(method, rank)
                if args.ranks is None and method == "adalora":  # the recipe's own pair, whatever its ratio
                    rank_setting = {"target_r": base.method.target_r, "init_r": base.method.init_r}
                hidden = hidden_sizes[model]
                if args.ranks is not None and rank is not None and hidden is not None and rank > hidden:
                    raise UserError(
                        f"--ranks {rank} is larger than {model}'s hidden size {hidden}: no layer has that many "
                        f"independent directions; use ranks up to {hidden}"
                    )
                rank_flags = {k: str(v) for k, v in rank_setting.items()} if args.ranks is not None else {}
                for seed in seeds:
                    argv = _flags({**base_flags, **rank_flags, "seed": str(seed)})
                    config = _parse(parse_args, defaults, name, argv, preflight=True)
                    trial = Trial(
                        recipe=name, script=script, method=method, model=config.model.model, rank=rank,
                        seed=seed, axes={k: combo[k] for k in varying}, argv=argv,
                        config_hash=config_hash(config.to_dict(), args.cpu_threads),
                        rank_setting=rank_setting, scored_on=scored_on(config), objective=config.run.objective,
                    )
                    trial.trial_id = trial_id(trial, varying)
                    trials.append(trial)
    if getattr(args, "baseline", True):
        trials = with_baselines(trials, recipe_defaults, args.cpu_threads)
    _make_ids_unique(trials)
    return trials


# What an untrained model's scores depend on: the model as loaded and the data it is scored on.
SCORED_ON = ("model", "quantization", "dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
             "data_file", "task", "text_column", "label_column", "labels", "instruction", "prompt_format",
             "max_samples", "validation_split", "split_seed", "eval_file", "max_seq_length", "eval_max_samples",
             "forgetting_file", "forgetting_samples", "per_device_eval_batch_size")


def scored_on(config) -> str:
    settings = config.to_dict()
    return json.dumps({k: settings.get(k) for k in SCORED_ON}, sort_keys=True, default=str)


def with_baselines(trials: list[Trial], recipe_defaults: dict[str, dict[str, Any]], cpu_threads: int | None) -> list[Trial]:
    """The trials with one method-none trial (the untrained model, scored as every trial is) for each
    distinct model, quantization and eval set among them, with the first such trial's settings, placed
    just before that trial (so a sweep stopped early has the baseline of what it ran). Untrained
    scores do not depend on the seed, so each runs once."""
    from harness.config import parse_args

    baselines: dict[str, Trial] = {}  # (DPO and GRPO runs score the untrained model before training themselves)
    for trial in trials:
        if trial.scored_on in baselines or trial.method == "none" or trial.objective != "sft":
            continue
        flags = dict(zip(trial.argv[::2], trial.argv[1::2]))
        for key in RANK_FLAGS:
            flags.pop(f"--{key}", None)
        flags["--method"] = "none"
        argv = [part for item in flags.items() for part in item]
        config = _parse(parse_args, recipe_defaults[trial.recipe], trial.recipe, argv, preflight=True)
        quantization = config.model.quantization
        baseline = Trial(
            recipe=trial.recipe, script=trial.script, method="none", model=trial.model, rank=None, seed=trial.seed,
            axes=dict(trial.axes), argv=argv, config_hash=config_hash(config.to_dict(), cpu_threads),
            scored_on=trial.scored_on,
        )
        baseline.trial_id = _safe_id(["baseline", "16bit" if quantization == "none" else quantization,
                                      f"s{trial.seed}", *(f"{k}={v}" for k, v in trial.axes.items())])
        baselines[trial.scored_on] = baseline
    ordered: list[Trial] = []
    for trial in trials:
        baseline = baselines.pop(trial.scored_on, None)
        ordered += [baseline, trial] if baseline is not None else [trial]
    return ordered


def _parse(parse_args, defaults: dict[str, Any], name: str, argv: list[str], preflight: bool = False):
    """The trial's full config, exactly as the recipe will see it. With preflight, also every check the
    recipe makes before loading a model (ranges, data, the AdaLoRA schedule for this budget), so a
    trial its recipe would refuse fails the plan (and --dry-run), not the sweep halfway through."""
    import contextlib
    import io

    from harness.recipe import preflight as recipe_preflight

    try:
        config = parse_args({**defaults, "recipe": name}, [*argv, "--output_dir", "unused"])
        if preflight:
            with contextlib.redirect_stdout(io.StringIO()):  # its notes are the trial's to print
                recipe_preflight(dataclasses.replace(config, model=dataclasses.replace(config.model)), output_dir=False)
        return config
    except UserError as exc:
        raise UserError(f"recipe {name} refuses the settings {shlex.join(argv)}: {exc}") from None


def rank_settings(method: str, rank: int | None) -> dict[str, int]:
    if rank is None or method not in RANKED_METHODS:
        return {}
    if method == "adalora":
        return {"target_r": rank, "init_r": ADALORA_INIT_FACTOR * rank}
    return {"r": rank}


def _flags(settings: dict[str, str]) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key}", str(value))]


def config_hash(config: dict[str, Any], cpu_threads: int | None = None) -> str:
    # objective sft is left out: the setting is newer than the SFT sweeps already run, whose hashes stay.
    kept = {k: v for k, v in config.items() if k not in LOCATION_SETTINGS and (k, v) != ("objective", "sft")}
    if cpu_threads is not None:  # it changes the timings a benchmark is for
        kept["bench_cpu_threads"] = cpu_threads
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trial_id(trial: Trial, varying_axes: list[str]) -> str:
    parts = [trial.recipe, f"r{trial.rank}" if trial.rank is not None else "norank", f"s{trial.seed}"]
    parts += [f"{k}={trial.axes[k]}" for k in varying_axes]
    return _safe_id(parts)


def _safe_id(parts: list[str]) -> str:
    """A trial id usable as a folder name."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


def _make_ids_unique(trials: list[Trial]) -> None:
    seen: dict[str, int] = {}
    for t in trials:
        seen[t.trial_id] = seen.get(t.trial_id, 0) + 1
    for t in trials:
        if seen[t.trial_id] > 1:
            t.trial_id = f"{t.trial_id}-{t.config_hash[:8]}"


# ---------------------------------------------------------------------------- running one trial

_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # If the sweep is killed outright (SIGKILL), its running trial must not live on unsupervised.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _OutputPump(threading.Thread):
    """Copies the trial's console output to trial.log and (unless quiet) to this terminal."""

    def __init__(self, stream, log_path: Path, echo: bool):
        super().__init__(daemon=True)
        self.stream, self.log_path, self.echo = stream, log_path, echo

    def run(self) -> None:
        with open(self.log_path, "ab") as log:
            while chunk := self.stream.read1(65536):
                log.write(chunk)
                log.flush()
                if self.echo:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()


def _kill_tree(pid: int) -> None:
    import psutil

    try:
        parent = psutil.Process(pid)
        victims = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for process in victims:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


def _wait(pid: int, deadline: float | None):
    """(status, rusage) once the child exits, or None at the deadline."""
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def _stop(pid: int, grace_s: float):
    """Ask the trial to stop like Ctrl-C would (it then records itself as interrupted), kill it if it
    does not within grace_s, and reap it."""
    try:
        os.kill(pid, signal.SIGINT)
        reaped = _wait(pid, time.monotonic() + grace_s)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        reaped = None
    if reaped is None:
        _kill_tree(pid)
        _, status, usage = os.wait4(pid, 0)
        return status, usage
    return reaped


def run_trial(trial: Trial, trial_dir: Path, timeout_s: float, echo: bool, cpu_threads: int | None = None) -> dict[str, Any]:
    """Run one trial in its own process; what happened, measured from outside the trial."""
    # A leftover checkpoint from an earlier attempt would make the recipe resume and time only part of it.
    shutil.rmtree(trial_dir, ignore_errors=True)
    run_dir = trial_dir / "run"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(trial.script), *trial.argv, "--output_dir", str(run_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu_threads is not None:
        env.update(OMP_NUM_THREADS=str(cpu_threads), MKL_NUM_THREADS=str(cpu_threads))
    started = time.monotonic()
    started_at = _now()
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )
    pump = _OutputPump(proc.stdout, trial_dir / "trial.log", echo)
    pump.start()
    timed_out = interrupted = False
    try:
        reaped = _wait(proc.pid, started + timeout_s)
        if reaped is None:
            timed_out = True
            _kill_tree(proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
        else:
            status, usage = reaped
    except KeyboardInterrupt:
        interrupted = True
        status, usage = _stop(proc.pid, grace_s=30)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4 here, not by Popen
    pump.join(timeout=10)
    proc.stdout.close()
    outcome = {
        "exit_code": proc.returncode,
        "timed_out": timed_out,
        "interrupted": interrupted,
        "wall_seconds": round(time.monotonic() - started, 3),
        # ru_maxrss of this child alone (KiB on Linux): its whole life, model load and evaluation included
        "process_peak_rss_mb": round(peak_rss_mb(usage), 1),
        "started_at": started_at,
        "finished_at": _now(),
        "result": _read_result(run_dir / "result.json"),
        "log_tail": _tail(trial_dir / "trial.log"),
    }
    return outcome


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _tail(path: Path, max_chars: int = 2000) -> str:
    try:
        text = path.read_bytes()[-8 * max_chars:].decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]  # keep a progress bar's last state
    return "\n".join(line for line in lines if line.strip())[-max_chars:]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def classify(outcome: dict[str, Any], memory_budget_gb: float | None, timeout_s: float) -> tuple[str, str | None]:
    """The trial's status and, unless ok, the reason in one line."""
    result = outcome["result"] or {}
    code = outcome["exit_code"]
    last_line = outcome["log_tail"].splitlines()[-1] if outcome["log_tail"] else ""
    if outcome["timed_out"]:
        return "timeout", f"killed after the {timeout_s:g} s wall-clock limit (--trial-timeout)"
    if outcome["interrupted"]:
        return "interrupted", "the sweep was stopped (Ctrl-C / SIGTERM) during this trial"
    budget_mb = memory_budget_gb * 1024 if memory_budget_gb else None
    if code == 0 and result.get("status") == STATUS_OK:
        if budget_mb is not None and result.get("peak_memory_kind") == "cpu_rss":
            peak = max(outcome["process_peak_rss_mb"], result.get("peak_memory_mb") or 0)
            if peak > budget_mb:
                return "over-budget", (
                    f"peak RSS {peak:.0f} MiB > the {memory_budget_gb:g} GiB memory budget "
                    "(CPU: checked after the run, not enforced)"
                )
        return STATUS_OK, None
    if code == EXIT_OOM or result.get("status") == "oom":
        if budget_mb is not None and result.get("memory_budget_enforced") == "cuda_allocator":
            return "over-budget", f"out of memory at the {memory_budget_gb:g} GiB cap: the trial needs more"
        return "oom", (result.get("error") or last_line or "out of memory")[:300]
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (the kernel's out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return "failed", f"killed by {name}{hint}"
    # A recipe's own UserError is one line on stderr: the most useful reason there is.
    reason = last_line if code == 2 else (result.get("error") or last_line or f"exit code {code}")
    return "failed", reason.strip()[:300]


# ---------------------------------------------------------------------------- the sweep

def run_sweep(args: argparse.Namespace, argv: list[str]) -> int:
    from harness.flops import mfu_percent
    from harness.offline_models import OFFLINE_MODELS

    name = args.name or _slug(args.model or "default-models")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise UserError(f"--name {name!r}: use letters, digits and . _ + - only (it becomes a file name)")
    offline = args.model in OFFLINE_MODELS
    no_budget = all(getattr(args, b) is None for b in ("budget_steps", "budget_seconds", "budget_tokens"))
    if offline and no_budget:
        args.budget_steps = OFFLINE_BUDGET_STEPS
        given = {item.partition("=")[0].strip().lstrip("-") for item in args.sets}
        extra = [f"{k}={v}" for k, v in OFFLINE_SETTINGS.items() if k not in given]
        args.sets = [*args.sets, *extra]
        print(f"Offline model without a budget: --budget-steps {OFFLINE_BUDGET_STEPS}"
              f"{''.join(f', --set {e}' for e in extra)} for every trial.", flush=True)
    if offline and args.cpu_threads is None:
        args.cpu_threads = OFFLINE_CPU_THREADS
    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise UserError(f"--cpu-threads must be at least 1, got {args.cpu_threads}")
    if args.trial_timeout is not None and not args.trial_timeout > 0:  # 0 used to mean "the default"
        raise UserError(f"--trial-timeout must be a positive number of seconds, got {args.trial_timeout}")
    timeout_s = args.trial_timeout or (600.0 if offline else 21600.0)

    results_dir = Path(args.results_dir).expanduser().resolve()
    sweep_dir = Path(args.output_root).expanduser().resolve() / name
    check_writable(results_dir, "--results-dir")
    runs_file = results_dir / RUNS_FILE
    records = read_records(runs_file)  # warns about (and skips) a line cut short by a crash

    trials = plan_trials(args)
    if args.dry_run:
        for i, t in enumerate(trials, 1):
            print(f"[{i}/{len(trials)}] {t.trial_id}: {_command(t, sweep_dir)}")
        return 0
    check_writable(sweep_dir, "--output-root")
    done = {r.get("trial_hash") for r in records if r.get("sweep") == name and r.get("status") == STATUS_OK}
    bench_command = shlex.join(["python", "-m", "harness.bench", *argv])
    print(f"Sweep {name}: {len(trials)} trials; records -> {_show(runs_file)}; trial folders -> {_show(sweep_dir)}",
          flush=True)

    durations: list[float] = []
    not_ok = 0
    try:
        for i, trial in enumerate(trials, 1):
            head = f"[{i}/{len(trials)}] {trial.trial_id}"
            if trial.config_hash in done and not args.force:
                print(f"{head}: already recorded ok, skipped (--force reruns it)", flush=True)
                continue
            eta = _eta(durations, len(trials) - i + 1)
            print(f"{head}: {trial.recipe} ({trial.method}{_rank_text(trial)}, seed {trial.seed}"
                  f"{''.join(f', {k}={v}' for k, v in trial.axes.items())}){eta}", flush=True)
            outcome = run_trial(trial, sweep_dir / trial.trial_id, timeout_s, echo=not args.quiet,
                                cpu_threads=args.cpu_threads)
            status, reason = classify(outcome, args.memory_budget_gb, timeout_s)
            result = outcome.pop("result")
            record = {
                "schema": 1,
                "sweep": name,
                "trial_id": trial.trial_id,
                "trial_hash": trial.config_hash,
                "status": status,
                "reason": reason,
                "recipe": trial.recipe,
                "method": trial.method,
                "model": trial.model,
                "rank": trial.rank,
                "rank_setting": trial.rank_setting,
                "seed": trial.seed,
                "axes": trial.axes,
                "scored_on": trial.scored_on,
                "budgets": {
                    "steps": args.budget_steps, "seconds": args.budget_seconds, "tokens": args.budget_tokens,
                    "memory_gb": args.memory_budget_gb, "trial_timeout_s": timeout_s,
                },
                "cpu_threads": args.cpu_threads,
                **{k: outcome[k] for k in ("exit_code", "wall_seconds", "process_peak_rss_mb", "started_at", "finished_at")},
                "error_tail": outcome["log_tail"] if status != STATUS_OK else None,
                "mfu_percent": mfu_percent(result) if result else None,
                "bench_command": bench_command,
                "trial_command": _command(trial, sweep_dir),
                "trial_dir": _show(sweep_dir / trial.trial_id),
                "result": result,
            }
            append_record(runs_file, record)
            durations.append(outcome["wall_seconds"])
            not_ok += status != STATUS_OK
            print(f"{head}: {status} in {outcome['wall_seconds']:.1f} s{_summary(record)}", flush=True)
            if outcome["interrupted"]:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        print(f"bench: interrupted; the {len(durations)} trial(s) finished so far are recorded in {_show(runs_file)}; "
              "rerun the same command to resume", file=sys.stderr, flush=True)
        _write_tables(results_dir, name)
        return EXIT_INTERRUPTED
    _write_tables(results_dir, name)
    if not_ok:
        print(f"{not_ok} of {len(durations)} trial(s) run did not finish ok; the reasons are in the table", flush=True)
    return 1 if not_ok else 0


def _write_tables(results_dir: Path, name: str) -> None:
    from harness.report import write_report

    written = write_report(results_dir, name)
    if written:
        print("Tables and plots: " + ", ".join(_show(p) for p in written), flush=True)


def _rank_text(trial: Trial) -> str:
    if not trial.rank_setting:
        return ", no rank"
    return ", " + ", ".join(f"{k} {v}" for k, v in trial.rank_setting.items())


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != STATUS_OK:
        return f": {record['reason']}"
    result = record["result"]
    score = (result.get("eval") or {}).get("accuracy")
    return (f": peak {result.get('peak_memory_mb')} MiB ({result.get('peak_memory_kind')}), "
            f"train {result.get('train_seconds')} s, eval loss {result.get('eval_loss')}"
            + (f", accuracy {score:.3f}" if isinstance(score, float) else ""))


def _eta(durations: list[float], remaining: int) -> str:
    if not durations:
        return ""
    seconds = sum(durations) / len(durations) * remaining
    return f"; ETA {int(seconds // 60)}m{int(seconds % 60):02d}s from {len(durations)} finished trial(s)"


def _command(trial: Trial, sweep_dir: Path) -> str:
    script = _show(trial.script)
    return shlex.join(["python", script, *trial.argv, "--output_dir", _show(sweep_dir / trial.trial_id / "run")])


def _show(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text.strip("/").replace("/", "_")) or "sweep"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # SIGTERM (a scheduler, `kill`) stops the sweep as Ctrl-C does (reported_as_one_line turns it into
    # a KeyboardInterrupt): the running trial is recorded as interrupted.
    with reported_as_one_line("bench"):
        return run_sweep(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
