"""The README and the docs/ pages, held against the checkout: every relative link resolves (its file, and its
#anchor as a GitHub heading slug), and every command they show names a recipe, a `harness` module or an
`ft-cookbook` subcommand that exists and answers --help (in this process, so the whole file stays fast)."""
from __future__ import annotations

import importlib
import importlib.util
import re
import runpy
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import harness.commands

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MOST_LINES = 300
SET_UP = 'python -m venv .venv && .venv/bin/pip install -e ".[ray,dev]"'
TEST_COMMAND = ".venv/bin/python -m pytest -q"
# Names from before the package layout of harness/ and the pyproject.toml install: none may come back.
OLD_NAMES = re.compile(r"(?<![-\w])requirements\.txt|requirements-ray\.txt|harness/recipe\.py|harness\.recipe\b|"
                       r"harness/rundir\.py|harness\.rundir\b|harness/data\.py|harness\.convert_llama2c\b|"
                       r"harness/select_train_judge\.py")

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


# --- markdown: prose and code apart -------------------------------------------------------------------------

def split_fences(text: str) -> tuple[list[str], list[list[str]]]:
    """The lines outside fenced code blocks, and each fenced block's lines."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        if FENCE.match(line):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
        elif block is None:
            prose.append(line)
        else:
            block.append(line)
    if block is not None:  # an unclosed fence: GitHub runs it to the end of the file
        blocks.append(block)
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: links to their text, lowercase, punctuation but '-' and '_' dropped, each
    space a '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    found = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")  # GitHub numbers repeated headings
    return found


def links(text: str) -> list[str]:
    """Every markdown link target outside code (inline code spans blanked first, fenced blocks left out)."""
    prose, _ = split_fences(text)
    targets = []
    for line in prose:
        line = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)
        targets += LINK.findall(line)
    return targets


def broken_links(text: str, page: Path) -> list[str]:
    """What is wrong with each relative link of a page's text: a missing file, or a #anchor no heading has."""
    problems = []
    for target in links(text):
        if re.match(r"(?i)(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        if not path_part:  # an anchor in the page itself
            if anchor not in anchors(text):
                problems.append(f"{page.name}: {target}: no heading #{anchor} in this page")
            continue
        linked = (page.parent / path_part).resolve()
        if not linked.exists():
            problems.append(f"{page.name}: {target}: no such file ({linked})")
            continue
        if anchor and linked.suffix == ".md" and linked.is_file():
            if anchor not in anchors(linked.read_text(encoding="utf-8")):
                problems.append(f"{page.name}: {target}: no heading #{anchor} in {linked.name}")
    return problems


# --- commands -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    kind: str  # recipe | module | ft-cookbook
    target: str  # recipes/x.py | harness.x | the subcommand
    args: tuple[str, ...]
    text: str
    page: str


def placeholder(word: str) -> bool:
    """RECIPE, <recipe>, plan|bench, ...: a form, not a name to check."""
    return bool(re.search(r"[<>|A-Z]|\.\.\.", word))


def parse_command(line: str, page: str) -> Command | None:
    line = line.strip()
    if line.startswith("$ "):
        line = line[2:]
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):  # OMP_NUM_THREADS=1 python ...
        words = words[1:]
    if not words:
        return None
    head = words[0]
    if re.fullmatch(r"(\S*/)?python3?", head) and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2].split(".")[0] == "harness":
            return Command("module", words[2], tuple(words[3:]), line, page)
        if re.fullmatch(r"recipes/[^/\s]+\.py", words[1]):
            return Command("recipe", words[1], tuple(words[2:]), line, page)
        return None
    if re.fullmatch(r"(\S*/)?ft-cookbook", head):
        return Command("ft-cookbook", words[1] if len(words) > 1 else "--help", tuple(words[2:]), line, page)
    return None


def commands_in(text: str, page: str) -> list[Command]:
    """The commands a page shows: each line of a fenced block (with its `\\` continuations), and every inline
    code span outside them that starts with `python ` or `ft-cookbook `."""
    prose, blocks = split_fences(text)
    lines = []
    for block in blocks:
        joined = ""
        for line in block:
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            lines.append(joined + line)
            joined = ""
        if joined:
            lines.append(joined)
    for line in prose:
        for _, span in INLINE_CODE.findall(line):
            span = span.strip()
            if re.match(r"(\.venv/bin/)?(python|ft-cookbook) ", span):
                lines.append(span)
    found = [parse_command(line, page) for line in lines]
    return [c for c in found if c is not None]


def what_is_missing(command: Command) -> str | None:
    """Why a shown command names nothing that exists, or None."""
    if command.kind == "recipe":
        if placeholder(command.target):
            return None
        return None if (REPO / command.target).is_file() else f"no recipe file {command.target}"
    if command.kind == "module":
        if placeholder(command.target):
            return None
        try:
            spec = importlib.util.find_spec(command.target)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            return f"no module {command.target}"
        if spec.submodule_search_locations is not None:
            return None if importlib.util.find_spec(command.target + ".__main__") else f"{command.target} has no __main__"
        return None if callable(getattr(importlib.import_module(command.target), "main", None)) else \
            f"{command.target} has no main()"
    sub = command.target
    if sub in ("-h", "--help") or placeholder(sub):
        return None
    if sub not in {"train", "recipes", *harness.commands.COMMANDS}:
        return f"no ft-cookbook command {sub!r}"
    if sub == "train":
        recipe = command.args[0] if command.args else ""
        if placeholder(recipe):
            return None
        if not recipe or recipe.startswith("-"):
            return "ft-cookbook train without a recipe"
        path = Path(recipe) if recipe.endswith(".py") else Path("recipes") / f"{recipe}.py"
        return None if (REPO / path).is_file() else f"ft-cookbook train: no recipe {recipe}"
    return None


def help_key(command: Command) -> tuple[str, str] | None:
    """What one --help check covers: a recipe file, a module, a subcommand (a train's recipe included)."""
    if command.kind == "ft-cookbook":
        if command.target in ("-h", "--help"):
            return ("ft-cookbook", "--help")
        if placeholder(command.target):
            return None
        if command.target == "train":
            recipe = command.args[0] if command.args else ""
            return None if placeholder(recipe) or not recipe else ("ft-cookbook", f"train {recipe}")
        return ("ft-cookbook", command.target)
    return None if placeholder(command.target) else (command.kind, command.target)


def module_main(name: str):
    """The main(argv) that `python -m name` runs: the module's own, or for a package the one its __main__
    imports (`from harness.plan.cli import main`)."""
    spec = importlib.util.find_spec(name)
    if spec.submodule_search_locations is not None:
        source = Path(importlib.util.find_spec(name + ".__main__").origin).read_text(encoding="utf-8")
        name = re.search(r"^from\s+([\w.]+)\s+import\s+main\b", source, re.M).group(1)
    return importlib.import_module(name).main


def exit_code(run) -> int | None:
    try:
        returned = run()
    except SystemExit as exc:
        return exc.code
    return returned


SHOWN = [c for page in PAGES for c in commands_in(page.read_text(encoding="utf-8"), page.name)]
DISTINCT = list({c.text: c for c in SHOWN}.values())
HELP_CHECKS = list(dict.fromkeys(k for k in map(help_key, SHOWN) if k))


# --- the tests ----------------------------------------------------------------------------------------------

def test_the_pages_are_there():
    assert (REPO / "docs").is_dir()
    assert len(PAGES) > 5, PAGES
    # the scan finds each kind of command, or the tests below check nothing
    assert {c.kind for c in SHOWN} == {"recipe", "module", "ft-cookbook"}, SHOWN


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    assert broken_links(page.read_text(encoding="utf-8"), page) == []


def test_the_link_check_reports_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: here, `with code`\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    text = ("# Top\n\n[ok](other.md) [ok](other.md#a-heading-here-with-code) [ok](other.md#twice-1) [ok](#top)\n"
            "[web](https://example.com/nothere) [mail](mailto:a@b.c)\n"
            "[gone](missing.md) [bad anchor](other.md#nowhere) [bad local](#bottom)\n"
            "`[not a link](missing_in_code.md)`\n\n```\n[nor this](missing_in_fence.md)\n```\n")
    problems = broken_links(text, page)
    assert len(problems) == 3, problems
    assert any("missing.md" in p and "no such file" in p for p in problems)
    assert any("#nowhere" in p for p in problems)
    assert any("#bottom" in p for p in problems)


def test_slugs_are_githubs():
    assert slug("Several GPUs: `accelerate launch`") == "several-gpus-accelerate-launch"
    assert slug("Reruns into an existing output_dir") == "reruns-into-an-existing-output_dir"
    assert slug("Unsloth (optional, GPU)") == "unsloth-optional-gpu"
    assert slug("The quick start's demo") == "the-quick-starts-demo"
    assert slug("Will it fit?") == "will-it-fit"


@pytest.mark.parametrize("command", DISTINCT, ids=lambda c: f"{c.page}: {c.text[:70]}")
def test_every_shown_command_names_something_that_exists(command):
    assert what_is_missing(command) is None, f"{command.page}: {command.text}: {what_is_missing(command)}"


def test_the_command_check_reports_what_does_not_exist():
    text = ("```\npython recipes/no_such_recipe.py --max_steps 1\n.venv/bin/python -m harness.no_such_tool\n"
            "ft-cookbook no_such_command --help\nft-cookbook train no_such_recipe\n"
            "python -m harness.plan --gpu T4   # exists\n```\n"
            "Also `python -m harness.errors --help` (no main) and `ft-cookbook train RECIPE [settings]` (a form).\n")
    shown = commands_in(text, "sample.md")
    assert [c.kind for c in shown] == ["recipe", "module", "ft-cookbook", "ft-cookbook", "module", "module",
                                       "ft-cookbook"]
    missing = [what_is_missing(c) for c in shown]
    assert missing[4] is None and missing[6] is None, missing
    assert all(missing[:4]) and missing[5], missing


@pytest.mark.parametrize("key", HELP_CHECKS, ids=lambda k: " ".join(k))
def test_every_shown_command_answers_help(key, monkeypatch, capsys):
    kind, target = key
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # recipes and `ft-cookbook train` set it
    if kind == "recipe":
        path = str(REPO / target)
        monkeypatch.setattr(sys, "argv", [path, "--help"])
        code = exit_code(lambda: runpy.run_path(path, run_name="__main__"))
    elif kind == "module":
        code = exit_code(lambda: module_main(target)(["--help"]))
    else:
        argv = ["--help"] if target == "--help" else [*target.split(), "--help"]
        code = exit_code(lambda: harness.commands.main(argv))
    out = capsys.readouterr()
    assert code in (0, None), f"{key}: exit {code}\n{out.err[-2000:]}"
    assert out.out.strip(), f"{key}: --help printed nothing"


CHECKOUT_PATH = re.compile(r"(?<![\w/.~-])(?:recipes|data|results|models)/[\w./<>-]*\.[A-Za-z]+\b")


def checkout_paths_in_code(text: str) -> list[str]:
    """The paths into the checkout (recipes/, data/, results/, models/) that code shows, forms like <sweep> left out."""
    prose, blocks = split_fences(text)
    code = [line for block in blocks for line in block]
    code += [span for line in prose for _, span in INLINE_CODE.findall(line)]
    return [p for line in code for p in CHECKOUT_PATH.findall(line) if not re.search(r"[<>|]|\.\.\.", p)]


def test_every_checkout_path_in_code_exists():
    missing = [f"{page.name}: {path}" for page in PAGES
               for path in checkout_paths_in_code(page.read_text(encoding="utf-8")) if not (REPO / path).exists()]
    assert missing == []
    shown = checkout_paths_in_code("`--config recipes/configs/none.yaml` and `results/<sweep>.md`\n")
    assert shown == ["recipes/configs/none.yaml"]


def test_readme_is_a_front_door():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MOST_LINES
    _, blocks = split_fences(text)
    assert [SET_UP] in blocks and [TEST_COMMAND] in blocks
    for page in (REPO / "docs").glob("*.md"):  # every docs page is linked from the README
        assert f"(docs/{page.name})" in text, page.name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_old_names(page):
    assert OLD_NAMES.findall(page.read_text(encoding="utf-8")) == []
