"""Generated sections of text files: what lies between a `<!-- NAME:begin -->` line and a
`<!-- NAME:end -->` line. Tools write their figures there (tools.docs.figures, the
documentation's deterministic figures; tools.bench.realtime, the real-clock table) and
the prose around them stays the authors'. Pure string work plus one atomic file write.
"""

from __future__ import annotations

from pathlib import Path


class MarkerError(ValueError):
    """A file without the section to write into (one line)."""


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def read_between(text: str, name: str) -> str | None:
    """The section's text (without the marker lines), None when the file has no such section."""
    begin, end = markers(name)
    if begin not in text or end not in text.split(begin, 1)[1]:
        return None
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def replace_between(text: str, name: str, body: str) -> str:
    """`text` with the section's content replaced by `body`; MarkerError without the section."""
    begin, end = markers(name)
    if read_between(text, name) is None:
        raise MarkerError(f"no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return f"{head}{begin}\n{body.strip(chr(10))}\n{end}{tail}"


def write_between(path: Path, name: str, body: str) -> None:
    """Rewrite the section in the file at `path`: the whole file is replaced at once (a
    temporary file renamed over it), or nothing is written."""
    path = Path(path)
    try:
        new = replace_between(path.read_text(encoding="utf-8"), name, body)
    except MarkerError as e:
        raise MarkerError(f"{path}: {e}") from None
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)
