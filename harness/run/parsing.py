"""The one path every setting's value takes into the dataclasses (harness.run.config), whether from the command line,
a --config file or a recipe's defaults: parsers that check each value as it is parsed (finite numbers, allowed
choices), config files read with every key once, and a value of the wrong type refused in one line."""
from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from harness.errors import UserError, raise_usage_error


class CheckedValues:
    """An argument parser mixin (before HfArgumentParser or TrlParser), the one way every value of every setting
    comes in, whether from the command line, a --config file or the recipe's defaults: each is checked before any
    dataclass is built from it (so before its __post_init__ runs). A float must be finite (argparse's float() takes
    "inf" and "nan", YAML has .inf and .nan: a run would train to NaN weights and record ok), and a setting with
    choices must hold one of them (argparse checks the command line's, not a config file's)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, remaining = super().parse_known_args(args, namespace)
        for action in self._actions:
            if action.dest in vars(namespace):
                _check_parsed_value(action, getattr(namespace, action.dest), self._field_default(action.dest))
        return namespace, remaining

    def _field_default(self, dest: str) -> Any:
        for cls in getattr(self, "dataclass_types", ()):
            found = cls.__dataclass_fields__.get(dest)
            if found is not None:
                return found.default
        return None


def _check_parsed_value(action, value: Any, field_default: Any) -> None:
    bad = _non_finite(value)
    if bad is not None:
        examples = [d for d in (action.default, field_default) if _non_finite(d) is None and _is_number(d) and d]
        shown = _show_number(bad) if bad is value else f"{value!r} holds {_show_number(bad)}, which"
        raise UserError(f"--{action.dest} {shown} is not a finite number: pass "
                        + (f"a number such as {_show_number(examples[0])}" if examples else "a finite number"))
    if action.choices is not None and value is not None:
        allowed = [getattr(c, "value", c) for c in action.choices]
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if getattr(item, "value", item) not in allowed:
                raise UserError(f"unknown --{action.dest} {item!r}; use {', '.join(map(str, allowed))}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any, depth: int = 0) -> float | None:
    """The first inf or nan in a value (a number, or a list or mapping of them, e.g. --loss_weights), else None."""
    if isinstance(value, float):
        return value if not math.isfinite(value) else None
    if depth < 4 and isinstance(value, (list, tuple, dict)):  # bounded: settings nest a level or two at most
        for item in value.values() if isinstance(value, dict) else value:
            found = _non_finite(item, depth + 1)
            if found is not None:
                return found
    return None


def _show_number(value: float) -> str:
    return repr(value) if isinstance(value, float) and not math.isfinite(value) else f"{value:g}"


class SettingsParser(CheckedValues, HfArgumentParser):
    """transformers' HfArgumentParser, every value checked as it is parsed."""


def checked_parse(parse) -> list[Any]:
    """parse() (an HfArgumentParser's, returning the dataclasses and the strings it did not know), with
    every way it can refuse as one line: a bad value, an unknown flag, a value of the wrong type."""
    try:
        *parts, unknown_args = parse()
    except ValueError as exc:
        raise UserError(f"{exc} (see --help for every setting)") from None
    if unknown_args:
        raise UserError(f"unknown setting(s): {' '.join(unknown_args)} (see --help for every setting)")
    for part in parts:
        if not isinstance(part, TrainingArguments):  # transformers checks its own
            _check_field_types(part)
    return parts


_PLAIN_TYPES = (str, int, float, bool, type(None))


def _field_types(annotation: Any) -> list[type] | None:
    """The plain types a field allows ("int | None" -> [int, NoneType]); None for anything else."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    parts = list(typing.get_args(annotation)) if union else [annotation]
    return parts if all(t in _PLAIN_TYPES for t in parts) else None


def _check_field_types(part: Any) -> None:
    """A value of the wrong type (from a YAML/JSON config file: the command line converts its strings)
    is refused here, not deep inside a library."""
    # From the class's annotations: HfArgumentParser rewrites each field's .type, dropping "| None".
    hints = typing.get_type_hints(type(part))
    for f in dataclasses.fields(part):
        allowed = _field_types(hints.get(f.name))
        if allowed is None:
            continue  # a type this check does not know: left to the code that uses it
        value = getattr(part, f.name)
        accepted = tuple(allowed) + ((int,) if float in allowed else ())  # YAML's 1 for a float setting
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, accepted):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise UserError(f"--{f.name} must be {wanted}, got {value!r} (check the config file)")


def parse_dataclasses(classes: tuple[type, ...], argv: list[str] | None = None) -> list[Any]:
    """A tool's own dataclasses from the command line (transformers' HfArgumentParser), with a bad or
    unknown flag reported as one line like every other error."""
    parser = SettingsParser(classes)
    parser.error = raise_usage_error
    args = list(argv) if argv is not None else sys.argv[1:]
    return checked_parse(lambda: parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True))


def check_config_file(args: list[str]) -> None:
    if "--config" not in args:
        return
    if args.count("--config") > 1:
        raise UserError("--config is given more than once; merge the files into one")
    i = args.index("--config")
    if i + 1 >= len(args):
        raise UserError("--config needs a path to a YAML or JSON file")
    path = Path(args[i + 1])
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # YAML is a superset of JSON
    except _DuplicateKey as exc:
        where = f"lines {exc.first} and {exc.second}" if exc.first != exc.second else f"line {exc.first}, twice"
        raise UserError(f"config file {path} sets {exc.key!r} twice (on {where}): keep one (YAML and JSON readers "
                        "silently take the later)") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} is not valid YAML/JSON: {str(exc).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of setting: value")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a mapping that names a key twice (plain YAML, and json.loads, keep the
    last silently). Keys brought in by a merge (<<: *defaults) may be overridden: that is what merging is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in lines:
                        raise _DuplicateKey(key, lines[key], line)
                    lines[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)
