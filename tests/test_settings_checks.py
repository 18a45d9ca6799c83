"""Every setting is checked on its way in, before any model loads: non-finite numbers (from the command line and config
files alike, in every recipe's settings, TRL's included), values a config file gives a setting with choices, TRL's own
settings that its trainers would refuse only after loading (or never), a config file naming a key twice, and a window
(--max_seq_length) beyond the positions the model has."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from harness.errors import UserError
from harness.locations import RECIPES_DIR, REPO_ROOT
from harness.objectives.registry import all_training_classes
from harness.run import command_line
from harness.run.checks import check_trl_settings, check_window_fits_model
from harness.run.command_line import parse_args
from harness.run.flow import load_recipe
from harness.run.parsing import _UniqueKeyLoader

RECIPES = sorted(path.stem for path in RECIPES_DIR.glob("*.py"))


def _run_recipe(name: str, argv: list[str], capfd, monkeypatch) -> tuple[int, str]:
    """The recipe script run as the command line runs it (as __main__), in this process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(RECIPES_DIR / f"{name}.py"), *argv])
    capfd.readouterr()
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(RECIPES_DIR / f"{name}.py"), run_name="__main__")
    return stop.value.code, capfd.readouterr().err


def _takes_floats(annotation) -> bool:
    """float, float | None, list[float], list[float] | None: a setting that holds floats."""
    parts = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) else (annotation,)
    return any(part is float or typing.get_args(part) == (float,) for part in parts)


def _float_settings(name: str, capfd, monkeypatch, tmp_path) -> list[str]:
    """The settings holding floats of the parser the recipe really builds (its own extra settings classes
    included), found by running it once and keeping the parser it parses with."""
    built = []
    original = command_line.RecipeParser.parse_known_args

    def spy(self, *args, **kwargs):
        built.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(command_line.RecipeParser, "parse_known_args", spy)
    code, err = _run_recipe(name, ["--output_dir", str(tmp_path / "out"), "--learning_rate", "nan"], capfd, monkeypatch)
    monkeypatch.setattr(command_line.RecipeParser, "parse_known_args", original)
    assert code == 2 and built, err
    fields = {}
    for cls in built[0].dataclass_types:
        hints = typing.get_type_hints(cls)
        fields.update({f: hints[f] for f in cls.__dataclass_fields__ if cls.__dataclass_fields__[f].init})
    return sorted(f for f, annotation in fields.items() if _takes_floats(annotation))


@pytest.mark.parametrize("name", RECIPES)
def test_every_float_setting_of_every_recipe_refuses_nan_and_inf(name, capfd, monkeypatch, tmp_path):
    """Generic over the recipes and their settings: a float setting added to any of their classes (ours, TRL's,
    transformers', a recipe's own) is covered without a line here. Refused while parsing, so before anything loads."""
    settings = _float_settings(name, capfd, monkeypatch, tmp_path)
    assert {"learning_rate", "adam_beta1", "lora_dropout", "validation_split"} <= set(settings)
    out = tmp_path / "out"
    for setting in settings:
        for value in ("nan", "inf", "-inf"):
            code, err = _run_recipe(name, ["--output_dir", str(out), f"--{setting}={value}"], capfd, monkeypatch)
            lines = err.splitlines()
            assert code == 2 and len(lines) == 1, (setting, value, err[-1500:])
            assert lines[0].startswith(f"{name}: --{setting} ") and "is not a finite number: pass " in lines[0], lines[0]
    assert not out.exists()


def test_a_config_file_with_non_finite_values_is_refused_as_the_command_line_is(tmp_path):
    config = tmp_path / "run.yaml"
    defaults = {**load_recipe("qwen2_5_0_5b_dpo").DEFAULTS, "recipe": "qwen2_5_0_5b_dpo"}
    for text, setting in (("beta: .nan\n", "beta"), ("loss_weights: [1.0, .inf]\n", "loss_weights"),
                          ("max_steps: .inf\n", "max_steps")):
        config.write_text(text)
        with pytest.raises(UserError, match=rf"^--{setting} .*not a finite number"):
            parse_args(defaults, ["--config", str(config), "--output_dir", str(tmp_path / "out")])


def test_a_config_file_value_outside_a_settings_choices_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("packing_strategy: wrapd\n")
    defaults = {**load_recipe("qwen2_5_0_5b_lora").DEFAULTS, "recipe": "qwen2_5_0_5b_lora"}
    with pytest.raises(UserError, match=r"^unknown --packing_strategy 'wrapd'; use bfd, bfd_split, wrapped$"):
        parse_args(defaults, ["--config", str(config), "--output_dir", str(tmp_path / "out")])
    config.write_text("packing_strategy: bfd_split\neval_strategy: steps\n")  # valid values pass, enums included
    assert parse_args(defaults, ["--config", str(config), "--output_dir", str(tmp_path / "out")]).train.packing_strategy == "bfd_split"


def test_trl_settings_lists_and_bounds_hold_trls_own_defaults():
    """The values read from TRL's help (loss types, f-divergences) are there and include TRL's default; every bounded
    setting exists and its TRL default is in bounds: a TRL release that rewords its help or renames a setting fails
    here, not in a user's run."""
    declared = [cls for cls in all_training_classes() if getattr(cls, "SETTING_VALUES", None) or getattr(cls, "SETTING_BOUNDS", None)]
    assert {cls.__name__ for cls in declared} == {"DPOSettings", "GRPOSettings"}
    for cls in declared:
        fields = cls.__dataclass_fields__
        for name, allowed in cls.SETTING_VALUES.items():
            default = fields[name].default_factory() if callable(fields[name].default_factory) else fields[name].default
            assert len(allowed) >= 4 and set(default if isinstance(default, list) else [default]) <= set(allowed), (name, allowed)
        assert set(cls.SETTING_BOUNDS) <= set(fields)
    for recipe in ("qwen2_5_0_5b_dpo", "qwen2_5_0_5b_grpo", "qwen2_5_0_5b_lora"):
        cfg = parse_args({**load_recipe(recipe).DEFAULTS, "recipe": recipe}, ["--output_dir", "unused"])
        check_trl_settings(cfg.train)  # the recipe's own settings pass


@pytest.mark.parametrize("recipe, argv, message", [
    ("qwen2_5_0_5b_dpo", ["--beta", "0"], "--beta must be greater than 0, got 0"),
    ("qwen2_5_0_5b_dpo", ["--beta=-0.5"], "--beta must be greater than 0, got -0.5"),
    ("qwen2_5_0_5b_dpo", ["--loss_type", "sigmoid", "ipx"], "unknown --loss_type 'ipx'"),
    ("qwen2_5_0_5b_dpo", ["--label_smoothing", "0.5"], "--label_smoothing must be in [0, 0.5), got 0.5"),
    ("qwen2_5_0_5b_grpo", ["--beta=-0.01"], "--beta must be at least 0, got -0.01"),
    ("qwen2_5_0_5b_grpo", ["--max_completion_length=-4"], "--max_completion_length must be at least 1, got -4"),
    ("qwen2_5_0_5b_grpo", ["--top_p", "1.5"], "--top_p must be in (0, 1], got 1.5"),
    ("qwen2_5_0_5b_grpo", ["--num_generations=-2"], "--num_generations -2: GRPO needs at least 2 generations"),
    ("qwen2_5_0_5b_lora", ["--adam_beta2", "1"], "--adam_beta2 must be in [0, 1), got 1"),
])
def test_trl_settings_are_refused_before_any_model_loads(recipe, argv, message, capfd, monkeypatch, tmp_path):
    out = tmp_path / "out"
    code, err = _run_recipe(recipe, ["--model", "tiny-qwen2", "--output_dir", str(out), *argv], capfd, monkeypatch)
    assert code == 2 and err.splitlines() == [err.strip()] and message in err, err[-1500:]
    assert not out.exists()


def test_zero_beta_stays_grpos_way_to_leave_out_the_kl_term(tmp_path):
    cfg = parse_args({**load_recipe("qwen2_5_0_5b_grpo").DEFAULTS, "recipe": "grpo"}, ["--beta", "0", "--output_dir", "x"])
    check_trl_settings(cfg.train)


def test_a_config_file_naming_a_key_twice_is_refused_with_both_lines(tmp_path):
    defaults = {**load_recipe("qwen2_5_0_5b_lora").DEFAULTS, "recipe": "qwen2_5_0_5b_lora"}
    config = tmp_path / "run.yaml"
    cases = {
        "r: 4\nlearning_rate: 1e-4\nr: 8\n": "sets 'r' twice (on lines 1 and 3)",
        "generation_kwargs:\n  top_k: 5\n  top_k: 6\n": "sets 'top_k' twice (on lines 2 and 3)",  # nested too
        '{"r": 4, "r": 8}': "sets 'r' twice (on line 1, twice)",
    }
    for text, message in cases.items():
        config.write_text(text)
        with pytest.raises(UserError, match=r"keep one") as refused:
            parse_args(defaults, ["--config", str(config), "--output_dir", str(tmp_path / "out")])
        assert message in str(refused.value)
    # A YAML merge's keys may be overridden: that is what a merge is for.
    config.write_text("base: &base {r: 4}\n<<: *base\nr: 8\n")
    assert yaml.load(config.read_text(), Loader=_UniqueKeyLoader)["r"] == 8


def _config_of(window: str | None, model: str, tmp_path):
    argv = ["--model", model, "--output_dir", str(tmp_path / "out")] + (["--max_seq_length", window] if window else [])
    return parse_args({**load_recipe("qwen2_5_0_5b_lora").DEFAULTS, "recipe": "qwen2_5_0_5b_lora"}, argv)


def test_a_window_beyond_the_models_positions_is_refused_when_asked_for_and_cut_when_the_recipes(tmp_path, capsys):
    asked = _config_of("1024", "stories260k", tmp_path)  # stories260k has 512 positions
    with pytest.raises(UserError, match=r"--max_seq_length 1024 is beyond the 512 positions stories260k has .* "
                                        r"pass --max_seq_length 512 or less"):
        check_window_fits_model(asked, may_download=False)
    check_window_fits_model(_config_of("512", "stories260k", tmp_path), may_download=False)  # its limit is fine

    recipes = _config_of(None, "stories260k", tmp_path)  # the recipe's 2048, written for Qwen2.5
    assert recipes.data.max_seq_length == 2048
    check_window_fits_model(recipes, may_download=False)
    assert recipes.data.max_seq_length == 512
    assert "the recipe's --max_seq_length 2048 is beyond the 512 positions stories260k has; using 512" in capsys.readouterr().out


def test_a_rope_scaled_model_has_no_hard_limit(tmp_path):
    from harness.models.offline import resolve_offline_model

    folder = tmp_path / "scaled"
    folder.mkdir()
    config = json.loads((Path(resolve_offline_model("stories260k")) / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    (folder / "config.json").write_text(json.dumps(config))
    check_window_fits_model(_config_of("1024", str(folder), tmp_path), may_download=False)
    config["rope_scaling"] = {"rope_type": "default"}  # stated but not scaling: the limit holds
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="beyond the 512 positions"):
        check_window_fits_model(_config_of("1024", str(folder), tmp_path), may_download=False)


def test_refused_as_a_fresh_process_before_anything_is_written(tmp_path):
    """As a user runs it: the DPO recipe with --beta 0 used to train and record ok. One line, exit 2, no folder."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(RECIPES_DIR / "qwen2_5_0_5b_dpo.py"), "--model", "tiny-qwen2", "--beta", "0",
                           "--output_dir", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["qwen2_5_0_5b_dpo: --beta must be greater than 0, got 0 (at 0 every pair has the "
                                        "same loss and nothing is learned; below 0 the rejected answers are learned; "
                                        "TRL's default is 0.1)"]
    assert not out.exists()
