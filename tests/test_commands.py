"""`ft-cookbook`, the console command: its subcommands are the python -m tools, its refusals are one line, and once
installed (the README's set-up) it works from any folder."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import commands
from harness.locations import RECIPES_DIR


def test_recipes_lists_every_recipe_with_its_first_docstring_line(capsys):
    assert commands.main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == sorted(p.stem for p in RECIPES_DIR.glob("*.py"))
    assert any(line.startswith("qwen2_7b_adalora") and "AdaLoRA" in line for line in lines)


@pytest.mark.parametrize("argv, says", [
    (["nope"], "ft-cookbook: unknown command 'nope'; one of train, recipes, plan"),
    (["train"], "ft-cookbook: train: name a recipe first"),
    (["train", "no_such_recipe"], "ft-cookbook: no recipe 'no_such_recipe'; one of llama2_7b_dora"),
])
def test_a_wrong_command_is_one_line_and_exit_2(argv, says, capsys):
    with pytest.raises(SystemExit) as stop:
        commands.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith(says), err


def test_each_subcommand_is_its_tools_own(capsys):
    """`ft-cookbook report --help` is `python -m harness.report --help`: the same parser, the same prog."""
    with pytest.raises(SystemExit) as stop:
        commands.main(["report", "--help"])
    assert stop.value.code == 0 and "usage: python -m harness.report" in capsys.readouterr().out
    assert set(commands.COMMANDS) == {"plan", "bench", "report", "summary", "infer", "merge", "select"}


def test_installed_console_command_trains_a_recipe_from_another_folder(tmp_path):
    """After `pip install -e .` the command finds recipes, data and offline models from any folder: a recipe by
    name, run from an empty folder, reads its default data file and writes where it is told."""
    installed = shutil.which("ft-cookbook", path=str(Path(sys.executable).parent))
    if installed is None:
        pytest.skip("ft-cookbook is not installed in this environment (the README's set-up installs it)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [installed, "train", "qwen2_5_0_5b_lora", "--model", "tiny-qwen2", "--max_steps", "1", "--max_samples", "12",
         "--max_seq_length", "96", "--eval_steps", "1", "--save_steps", "1", "--disable_tqdm", "true",
         "--output_dir", "run"], cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((elsewhere / "run" / "result.json").read_text())
    assert record["status"] == "ok" and record["data"]["data_file"].endswith("alpaca_en_demo.json")
    assert record["global_step"] == 1
