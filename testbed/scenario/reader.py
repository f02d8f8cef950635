"""Reading scenario files strictly: `ScenarioError`, a YAML loader that refuses a key given
twice, and a reader that checks one value at a time against its key path.

Owns what the scenario format (scenario.py and the scenario_*.py modules it is made of) is
read with, not the format itself: every check raises a `ScenarioError` whose one-line
message names the file and the key path (`devices[1].memory_mib: must be > 0`). Pure: no
asyncio, no torch, no IO of its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NoReturn

import yaml


def one_line(text: str) -> str:
    """`text` with every character that is not printable (a newline, a tab, a control
    character in a YAML key) written as its escape, so that an error stays one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ScenarioError(ValueError):
    """A scenario file that cannot be run. `str()` is one line: `FILE: key.path: what`,
    whatever the file name, keys and values it quotes hold (see `one_line`)."""

    def __init__(self, file: str, path: str, message: str) -> None:
        file, path, message = one_line(str(file)), one_line(str(path)), one_line(message)
        self.file, self.path, self.message = file, path, message
        where = f"{file}: {path}: " if path else f"{file}: "
        super().__init__(f"{where}{message}")


def short(value: object, limit: int = 40) -> str:
    """A value for an error line: long numbers and strings cut short."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class Reader:
    """Checks one value at a time and raises ScenarioError naming the file and key path.
    `keys` is the format's table of accepted keys per section (scenario.KEYS)."""

    keys: Mapping[str, tuple[str, ...]] = {}

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, message: str) -> NoReturn:
        raise ScenarioError(self.file, path, message)  # which keeps it one line

    def _wrong(self, value: object, path: str, what: str) -> NoReturn:
        hint = ""
        if what == "a number" and isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads 1e3 as text: write 1.0e3)"
            except ValueError:
                pass
        self.fail(path, f"must be {what}, got {type_name(value)}{hint}")

    def mapping(self, value: object, path: str) -> dict:
        if not isinstance(value, dict):
            self._wrong(value, path, "a mapping")
        return value

    def section(self, value: object, path: str, sections: str | tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict:
        """A mapping whose keys are those of `sections` in `keys` (every key checked here,
        so the table is the format's whole list of keys), with the `required` ones."""
        value = self.mapping(value, path)
        allowed = [k for s in ((sections,) if isinstance(sections, str) else sections) for k in self.keys[s]]
        prefix = f"{path}." if path else ""
        for key in value:
            if key not in allowed:
                self.fail(f"{prefix}{short(str(key))}",
                          f"unknown key {short(repr(key))} (allowed: {', '.join(allowed)})")
        for key in required:
            if key not in value:
                self.fail(f"{prefix}{key}", "is required")
        return value

    def list_(self, value: object, path: str) -> list:
        if not isinstance(value, list):
            self._wrong(value, path, "a list")
        return value

    def int_(self, value: object, path: str, ge: int | None = None, le: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self._wrong(value, path, "an integer")
        if ge is not None and value < ge:
            self.fail(path, f"must be >= {ge}, got {short(value)}")
        if le is not None and value > le:
            self.fail(path, f"must be <= {le}, got {short(value)}")
        return value

    def number(self, value: object, path: str, gt: float | None = None,
               ge: float | None = None, le: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong(value, path, "a number")
        try:
            value = float(value)
        except OverflowError:  # an integer beyond any float
            self.fail(path, f"must be a finite number, got {short(value)}")
        if not math.isfinite(value):
            self.fail(path, f"must be a finite number, got {value}")
        if gt is not None and value <= gt:
            self.fail(path, f"must be > {gt:g}, got {value:g}")
        if ge is not None and value < ge:
            self.fail(path, f"must be >= {ge:g}, got {value:g}")
        if le is not None and value > le:
            self.fail(path, f"must be <= {le:g}, got {value:g}")
        return value

    def string(self, value: object, path: str, pattern: re.Pattern | None = None,
               max_len: int | None = None) -> str:
        if not isinstance(value, str):
            self._wrong(value, path, "a string")
        if max_len is not None and len(value) > max_len:
            self.fail(path, f"is {len(value)} characters long, more than {max_len}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"{short(value)!r} must match {pattern.pattern}")
        return value

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self._wrong(value, path, "a boolean (true or false)")
        return value

    def choice(self, value: object, path: str, options: tuple[str, ...], what: str) -> str:
        name = self.string(value, path)
        if name not in options:
            self.fail(path, f"unknown {what} {name!r} (known: {', '.join(options)})")
        return name


# ---------------------------------------------------------------------------------------------
# YAML


def _construct_mapping(self: yaml.constructor.SafeConstructor, node: yaml.MappingNode,
                       deep: bool = False) -> dict:
    """SafeConstructor's, refusing a key given twice in one mapping (PyYAML keeps the last)."""
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = self.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # unhashable: the base class reports it
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
    return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep=deep)


# libyaml's loader when PyYAML has it (about four times faster: a file at the size limit is
# refused in about a second), else the pure-Python one; both safe, both strict
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
StrictLoader = type("StrictLoader", (_Base,), {"construct_mapping": _construct_mapping})


def check_nesting(text: str, limit: int) -> None:
    """Refuse collections nested deeper than `limit` before composing the document (a
    yaml.YAMLError): PyYAML composes recursively (a document 20,000 levels deep ends in
    RecursionError), while its event parser is a state machine, so counting levels over the
    events is safe."""
    depth = 0
    for ev in yaml.parse(text, Loader=_Base):
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > limit:
                raise yaml.parser.ParserError(None, None, f"nested more than {limit} levels deep",
                                              ev.start_mark)  # type: ignore[arg-type]  # the C parser's Mark is read alike
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1


def yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if mark is not None and problem:
        context = getattr(e, "context", None)
        text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
        return " ".join((f"{text} ({context})" if context else text).split())
    return " ".join(str(e).split())
