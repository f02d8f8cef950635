"""The scenario reference (docs/) held to the loader's own table of keys.

`python -m tools.docs.scenario_reference [DOC.md ...]` (default: every docs/*.md): exit 0 when
every key the loader accepts (`testbed.scenario.KEYS`) is documented and every documented
key is accepted, and the same for the values of `testbed.scenario.CHOICES`; else exit 1
with one line per problem.

A reference table says what it documents in a comment line above it:
`<!-- keys: SECTION[, SECTION...] -->` (its first column lists keys of those sections) or
`<!-- values: KEY -->` (its first column lists the values KEY may take). The first
markdown table after the comment is read; a cell's backticks are ignored. Sections are
named as in `KEYS`: `""` is written `top`, `[]` marks the items of a list.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"^<!--\s*(keys|values):\s*(.*?)\s*-->\s*$")
TOP = "top"  # how the reference names the top level (section "" in KEYS)


def first_column(lines: list[str], start: int) -> list[str]:
    """The first cells of the body rows of the first markdown table at or after `start`."""
    i = start
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        if MARK.match(lines[i].strip()):  # another marked table before any table: none here
            return []
        i += 1
    rows = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        rows.append(lines[i].strip().strip("|").split("|")[0].strip().strip("`").strip())
        i += 1
    return rows[2:]  # past the header and the |---| line


def documented(texts: Iterable[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(keys per section, values per key) that the marked tables of `texts` document."""
    keys: dict[str, set[str]] = {}
    values: dict[str, set[str]] = {}
    for text in texts:
        lines = text.splitlines()
        for i, line in enumerate(lines):
            m = MARK.match(line.strip())
            if not m:
                continue
            names = first_column(lines, i + 1)
            for target in (t.strip() for t in m.group(2).split(",")):
                into = keys if m.group(1) == "keys" else values
                into.setdefault("" if target == TOP else target, set()).update(names)
    return keys, values


def _where(section: str) -> str:
    return section or TOP


def problems(keys: Mapping[str, Iterable[str]], choices: Mapping[str, Iterable[str]],
             doc_keys: Mapping[str, set[str]], doc_values: Mapping[str, set[str]]) -> list[str]:
    """Every disagreement between what the loader accepts (`keys`, `choices`) and what the
    reference documents, one line each."""
    out = []
    for what, accepted, doc in (("key", keys, doc_keys), ("value", choices, doc_values)):
        for section in sorted(set(accepted) | set(doc)):
            have, said = set(accepted.get(section, ())), doc.get(section, set())
            if section not in accepted:
                out.append(f"{_where(section)}: the reference documents {what}s of a section the loader "
                           f"does not have: {', '.join(sorted(said))}")
                continue
            for k in sorted(have - said):
                out.append(f"{_where(section)}.{k}: {what} accepted by the loader but not documented")
            for k in sorted(said - have):
                out.append(f"{_where(section)}.{k}: {what} documented but not accepted by the loader")
    return out


def check(paths: Iterable[Path]) -> list[str]:
    from testbed.scenario import CHOICES, KEYS

    doc_keys, doc_values = documented(p.read_text(encoding="utf-8") for p in paths)
    return problems(KEYS, CHOICES, doc_keys, doc_values)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or sorted((ROOT / "docs").glob("*.md"))
    found = check(paths)
    for line in found:
        print(line)
    if not found:
        print(f"the scenario reference matches the loader ({len(paths)} files)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
