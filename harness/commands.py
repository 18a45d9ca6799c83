"""`ft-cookbook COMMAND ...`: one console command for every tool, beside the `python -m harness.*` forms.

  ft-cookbook train qwen2_7b_adalora --max_steps 5   # a recipe by name (recipes/NAME.py) or path
  ft-cookbook recipes                                # the recipes, one line each
  ft-cookbook plan --model Qwen/Qwen2-7B-Instruct --gpu T4
  ft-cookbook bench --ranks 4,8,16,32 --model stories260k
  ft-cookbook report | summary | infer | merge | select ...

Each command is the module's own: `ft-cookbook plan --help` is `python -m harness.plan --help`.
"""
from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path

from harness.errors import UserError, reported_as_one_line
from harness.locations import RECIPES_DIR

# command -> (module whose main(argv) runs it, what it answers). Imported only when chosen: `ft-cookbook report`
# needs no torch, and a typo is answered at once.
COMMANDS = {
    "plan": ("harness.plan.cli", "will it fit: the memory a method needs on a GPU, before anything downloads"),
    "bench": ("harness.bench.cli", "benchmark sweeps: recipes x ranks x seeds, into results/ tables"),
    "report": ("harness.reporting.page", "rebuild the benchmark tables and plots from results/runs.jsonl"),
    "summary": ("harness.reporting.summary", "a markdown summary of one run's result.json"),
    "infer": ("harness.infer", "answers or a chat from a base model with a trained adapter"),
    "merge": ("harness.merge", "merge a trained adapter into its base model"),
    "select": ("harness.alpaca100.select", "pick the k most valuable instruction records"),
}


def recipe_script(name: str) -> Path:
    """A recipe by name (recipes/NAME.py) or by path."""
    path = Path(name) if name.endswith(".py") else RECIPES_DIR / f"{name}.py"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.py")))
        raise UserError(f"no recipe {name!r}; one of {known}, or a recipe file's path")
    return path


def recipes_table() -> str:
    lines = []
    for path in sorted(RECIPES_DIR.glob("*.py")):
        first = (path.read_text(encoding="utf-8").split('"""')[1:2] or [""])[0].strip().splitlines()
        lines.append(f"{path.stem:<28} {first[0] if first else ''}")
    return "\n".join(lines)


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = [f"  {'train':<{width}}  RECIPE [settings]: run a recipe (its --help lists every setting)",
            f"  {'recipes':<{width}}  the recipes, one line each",
            *(f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items())]
    return "usage: ft-cookbook COMMAND [ARGS]   (COMMAND --help for its own)\n\n" + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported_as_one_line("ft-cookbook"):
        return _run(argv)


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "recipes":
        print(recipes_table())
        return 0
    if command == "train":
        if not rest or rest[0].startswith("-"):
            raise UserError("train: name a recipe first, e.g. ft-cookbook train qwen2_7b_adalora --help")
        script = recipe_script(rest[0])
        sys.argv = [str(script), *rest[1:]]  # the recipe reads its settings from the command line, as when run itself
        runpy.run_path(str(script), run_name="__main__")
        return 0
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; one of train, recipes, {', '.join(COMMANDS)} (--help says what each does)")
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
