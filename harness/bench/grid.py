"""What a sweep runs: its trials (recipe x rank x seed x --set axes, baselines first), each with the
full config its recipe will see, checked before anything runs, and a hash of that config."""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.bench.recipe_file import read_defaults
from harness.errors import UserError
from harness.locations import RECIPES_DIR
from harness.models.loading import resolve_model
from harness.objectives.registry import all_training_classes
from harness.reporting.runs import LOCATION_SETTINGS
from harness.run.command_line import parse_args
from harness.run.config import ARGUMENT_CLASSES
from harness.run.flow import preflight as recipe_preflight

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
    """A recipe's DEFAULTS, read from its file without running it (harness.bench.recipe_file)."""
    defaults = read_defaults(script)
    own = sorted(set(defaults) - setting_names())
    if own:
        raise UserError(
            f"recipe {name} has settings no training run has ({', '.join(own[:4])}{', ...' if len(own) > 4 else ''}): "
            "it is a flow of several runs, which harness.bench cannot sweep; run it directly"
        )
    return defaults


def model_hidden_size(model: str) -> int | None:
    """The model's hidden size, read from its config without downloading anything (None if unknown)."""
    from transformers import AutoConfig


    try:
        source = resolve_model(model)
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except UserError:
        raise
    except Exception:  # not cached / needs remote code: the trial itself will report what is wrong
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "hidden_size", None)


def plan_trials(args: argparse.Namespace) -> list[Trial]:
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


# Added later: part of what a model is scored on only when set, so sweeps recorded before them keep their baselines.
SCORED_ON_WHEN_SET = ("dataset_name", "dataset_config", "column_mapping")


def scored_on(config) -> str:
    settings = config.to_dict()
    scored = {k: settings.get(k) for k in SCORED_ON}
    scored.update({k: settings[k] for k in SCORED_ON_WHEN_SET if settings.get(k) is not None})
    if settings.get("dataset_name"):
        scored["dataset_split"] = settings.get("dataset_split")
    return json.dumps(scored, sort_keys=True, default=str)


def with_baselines(trials: list[Trial], recipe_defaults: dict[str, dict[str, Any]], cpu_threads: int | None) -> list[Trial]:
    """The trials with one method-none trial (the untrained model, scored as every trial is) for each
    distinct model, quantization and eval set among them, with the first such trial's settings, placed
    just before that trial (so a sweep stopped early has the baseline of what it ran). Untrained
    scores do not depend on the seed, so each runs once."""
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


