"""A recipe file's DEFAULTS, read without running the file.

harness.bench --recipes and harness.plan take any .py path. Importing it to look for DEFAULTS would run
whatever the file does at import time (a stray script, a typo'd path to something else) before it could
be refused, so the file is parsed instead, and DEFAULTS is evaluated from its syntax tree. The recipes'
DEFAULTS are not plain literals (`dict(**PRESET, key=value, ...)`, `dict(...) | dict(...)`), so what is
read is what they have in common:

  - literals (strings, numbers, True/False/None, lists, tuples, dicts);
  - `dict(**A, key=value)`, `{**A, "key": value}` and `A | B` of such dicts;
  - names bound by `from harness.<module> import NAME` (the project's own presets: importing the project's
    modules runs only the project's code) or by an earlier module-level `NAME = <any of the above>`.

Anything else in DEFAULTS (a call, an attribute, arithmetic, a name from outside the project) is refused
in one line: it could only be known by running the file.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

from harness.errors import UserError

WRITE_IT_LIKE = "write DEFAULTS as the recipes in recipes/ do: dict(**PRESET, setting=value, ...)"
MUTATING_METHODS = {"update", "setdefault", "pop", "popitem", "clear", "__setitem__", "__delitem__", "__ior__"}


class _Unreadable(Exception):
    """A part of DEFAULTS that only running the file could give; the node says where."""

    def __init__(self, node: ast.AST, why: str):
        super().__init__(f"line {getattr(node, 'lineno', '?')}: {why}")


def read_defaults(script: Path) -> dict[str, Any]:
    """The module-level DEFAULTS dict of a recipe file, without executing the file."""
    try:
        source = Path(script).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"recipe file {script} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                        "pass a recipe from recipes/") from None
    try:
        tree = ast.parse(source, filename=str(script))
    except SyntaxError as exc:
        raise UserError(f"recipe file {script} is not valid Python (line {exc.lineno}: {exc.msg}); "
                        "pass a recipe from recipes/") from None
    names: dict[str, ast.AST | tuple[str, str]] = {}  # a module-level name -> its value's node, or (module, name)
    found: ast.AST | None = None
    for statement in tree.body:
        if found is not None:  # what comes after DEFAULTS cannot change it (checked below); only a second one
            if any(isinstance(t, ast.Name) and t.id == "DEFAULTS" for t in _targets(statement)):
                raise UserError(f"recipe file {script} assigns DEFAULTS twice (line {statement.lineno}); "
                                f"{WRITE_IT_LIKE}")
            continue
        if isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
            for alias in statement.names:
                names[alias.asname or alias.name] = (statement.module, alias.name)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)) and statement.value is not None:
            direct = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            for target in _targets(statement):
                if target not in direct:  # A, B = ...: unpacked, not read
                    names.pop(target.id, None)
                elif target.id == "DEFAULTS":
                    found = statement.value
                else:
                    names[target.id] = statement.value
        else:  # a name bound any other way (def, class, for, import of a whole module) is not readable
            for target in _targets(statement):
                if isinstance(target, ast.Name):
                    names.pop(target.id, None)
    if found is None:
        raise UserError(f"{script} is not a recipe of this project: it has no module-level DEFAULTS "
                        "(read without running the file); pass a recipe from recipes/ or a file written like them")
    _refuse_changes_after(tree, script)
    try:
        defaults = _evaluate(found, names, set())
    except _Unreadable as exc:
        raise UserError(f"recipe file {script}: its DEFAULTS cannot be read without running the file ({exc}); "
                        f"{WRITE_IT_LIKE}") from None
    if not isinstance(defaults, dict) or not all(isinstance(k, str) for k in defaults):
        raise UserError(f"recipe file {script}: its DEFAULTS is not a dict of setting names; {WRITE_IT_LIKE}")
    return defaults


def _targets(statement: ast.stmt) -> list[ast.expr]:
    """The names a module-level statement binds (enough to see DEFAULTS and the names it uses)."""
    if isinstance(statement, ast.Assign):
        return [t for target in statement.targets for t in ast.walk(target)
                if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)]
    if isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        return [statement.target]
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [ast.Name(id=statement.name, ctx=ast.Store())]
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return [ast.Name(id=(a.asname or a.name).split(".")[0], ctx=ast.Store()) for a in statement.names]
    return [node for node in ast.walk(statement) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)]


def _refuse_changes_after(tree: ast.Module, script: Path) -> None:
    """DEFAULTS changed after its assignment (DEFAULTS["r"] = 8, DEFAULTS.update(...)) would differ from
    what the syntax tree says: such a file is refused rather than misread."""
    for node in ast.walk(tree):
        changed = (
            isinstance(node, (ast.Subscript, ast.Attribute)) and isinstance(node.ctx, (ast.Store, ast.Del))
            and isinstance(node.value, ast.Name) and node.value.id == "DEFAULTS"
        ) or (
            isinstance(node, (ast.Global, ast.Nonlocal)) and "DEFAULTS" in node.names
        ) or (
            isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name) and node.target.id == "DEFAULTS"
        ) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATING_METHODS
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "DEFAULTS"
        )
        if changed:
            raise UserError(f"recipe file {script} changes DEFAULTS after assigning it (line {node.lineno}), which "
                            f"only running the file would show; {WRITE_IT_LIKE}")


def _evaluate(node: ast.AST, names: dict, resolving: set[str]) -> Any:
    if isinstance(node, ast.Name):
        return _name(node, names, resolving)
    if isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id == "dict" and "dict" not in names):
            raise _Unreadable(node, f"a call of {ast.unparse(node.func)!r}")
        if len(node.args) > 1:
            raise _Unreadable(node, "dict() with more than one positional argument")
        value = dict(_mapping(_evaluate(node.args[0], names, resolving), node)) if node.args else {}
        for keyword in node.keywords:
            item = _evaluate(keyword.value, names, resolving)
            if keyword.arg is None:  # **A
                value.update(_mapping(item, keyword.value))
            else:
                value[keyword.arg] = item
        return value
    if isinstance(node, ast.Dict):
        value = {}
        for key, item in zip(node.keys, node.values):
            if key is None:  # {**A}
                value.update(_mapping(_evaluate(item, names, resolving), item))
            else:
                value[_evaluate(key, names, resolving)] = _evaluate(item, names, resolving)
        return value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        left, right = _evaluate(node.left, names, resolving), _evaluate(node.right, names, resolving)
        return {**_mapping(left, node.left), **_mapping(right, node.right)}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(item, names, resolving) for item in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    try:
        return ast.literal_eval(node)  # constants, negative numbers, sets
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _Unreadable(node, f"{ast.unparse(node)[:60]!r} is not a literal") from None


def _name(node: ast.Name, names: dict, resolving: set[str]) -> Any:
    bound = names.get(node.id)
    if bound is None:
        raise _Unreadable(node, f"the name {node.id!r} is not imported from harness or assigned above it")
    if isinstance(bound, tuple):
        module, attribute = bound
        if module != "harness" and not module.startswith("harness."):
            raise _Unreadable(node, f"{node.id!r} comes from {module}, not from this project")
        try:
            value = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError):
            raise _Unreadable(node, f"{module} has no {attribute!r}") from None
        if not _plain(value):
            raise _Unreadable(node, f"{module}.{attribute} is not a plain setting value")
        return value
    if node.id in resolving:  # A = dict(**A): a name defined through itself
        raise _Unreadable(node, f"{node.id!r} refers to itself")
    return _evaluate(bound, names, resolving | {node.id})


def _plain(value: Any) -> bool:
    """Data a setting can hold (what a preset is), not code."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _mapping(value: Any, node: ast.AST) -> dict:
    if not isinstance(value, dict):
        raise _Unreadable(node, f"{ast.unparse(node)[:60]!r} is not a dict")
    return value
