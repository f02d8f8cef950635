"""Hostile run directories, made from a real one: copies with markup in every text field
the tools accept (`marked_copy`), and copies the tools must refuse with one line
(`refused_copies`: /dev/zero, a FIFO, a link out of the directory, markup or text in a
number column, bytes that are not UTF-8, a field over the csv module's 128 KiB).

The markup tries everything at once: an element with an id (`pwn`), an image whose error
handler sets `window.__pwned`, a script, and quotes that would end an attribute. A page
that shows it as text creates none of it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKUP = ("\"'><img id=pwn src=x onerror=\"window.__pwned=1\">"
          "<script>window.__pwned=2</script><b id=pwn>x</b>")


def _edit_csv(path: Path, edit: Callable[[list[dict[str, str]]], None]) -> None:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols, rows = list(reader.fieldnames or []), list(reader)
    edit(rows)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    path.write_text(out.getvalue())


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def marked_copy(src: Path, dst: Path) -> Path:
    """A copy of run `src` with MARKUP in every text the tools read and the page shows: the
    algorithm, status, scenario name, a scenario event and its row in events.csv, device
    names (placements, telemetry, links), the token phase, summary.json's migrations,
    latency mean and fidelity reason."""
    shutil.copytree(src, dst)
    dev = "dev" + MARKUP

    def meta(m: dict[str, Any]) -> None:
        m["algorithm"] = "alg" + MARKUP
        m["status"] = "failed: " + MARKUP
        m["scenario"]["name"] = "scen" + MARKUP
        m["scenario"]["events"] = [{"at_token": 2, "action": "kind" + MARKUP}]
        m["scenario"]["devices"][1]["name"] = dev

    def summary(s: dict[str, Any]) -> None:
        s["status"] = "failed: " + MARKUP
        s["migrations"] = MARKUP
        s["latency_ms"]["mean"] = MARKUP
        s["fidelity"] = {"distorted": True, "reason": MARKUP}

    def events(rows: list[dict[str, str]]) -> None:
        rows.append({"t_s": "0.01", "token": "2", "kind": "kind" + MARKUP, "subject": MARKUP, "detail": MARKUP})

    def rename(*cols: str) -> Callable[[list[dict[str, str]]], None]:
        def edit(rows: list[dict[str, str]]) -> None:
            for r in rows:
                for c in cols:
                    if r[c] == "a":
                        r[c] = dev
        return edit

    def tokens(rows: list[dict[str, str]]) -> None:
        rows[-1]["phase"] = MARKUP

    _edit_json(dst / "meta.json", meta)
    _edit_json(dst / "summary.json", summary)
    _edit_csv(dst / "events.csv", events)
    _edit_csv(dst / "placements.csv", rename("device"))
    _edit_csv(dst / "telemetry.csv", rename("device"))
    _edit_csv(dst / "links.csv", rename("src", "dst"))
    _edit_csv(dst / "tokens.csv", tokens)
    return dst


def _set_cell(name: str, column: str, value: str, row: int = 1) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        def edit(rows: list[dict[str, str]]) -> None:
            rows[row][column] = value
        _edit_csv(d / name, edit)
    return make


def _link(name: str, target: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to(target)
    return make


def _fifo(name: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)
    return make


def _append(name: str, data: bytes) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        with open(d / name, "ab") as f:
            f.write(data)
    return make


def _outside(d: Path) -> None:
    secret = d.parent / f"{d.name}-secret.csv"
    shutil.copy(d / "tokens.csv", secret)
    _link("tokens.csv", str(secret))(d)


# name -> (how to spoil a copy, the one line expected after "<run dir>/")
REFUSED: dict[str, tuple[Callable[[Path], None], str]] = {
    "meta_dev_zero": (_link("meta.json", "/dev/zero"),
                      "meta.json: a link to /dev/zero, outside the run directory (refused)"),
    "summary_dev_zero": (_link("summary.json", "/dev/zero"),
                         "summary.json: a link to /dev/zero, outside the run directory (refused)"),
    "tokens_fifo": (_fifo("tokens.csv"), "tokens.csv: is a FIFO, not a regular file (refused)"),
    "summary_fifo": (_fifo("summary.json"), "summary.json: is a FIFO, not a regular file (refused)"),
    "tokens_outside": (_outside, "tokens.csv: a link to "),
    "markup_number": (_set_cell("tokens.csv", "latency_ms", MARKUP),
                      "tokens.csv: row 3, column 'latency_ms': '\"\\'><img id=pwn src=x"),
    "markup_migrations": (_set_cell("tokens.csv", "migrations", "<b>2</b>", 2),
                          "tokens.csv: row 4, column 'migrations': '<b>2</b>' is not an integer"),
    "text_telemetry": (_set_cell("telemetry.csv", "mem_current", "lots", 0),
                       "telemetry.csv: row 2, column 'mem_current': 'lots' is not a number"),
    "not_utf8": (_append("events.csv", b"0.1,3,replan,x,\xff\xfe\n"),
                 "events.csv: line "),
    "big_field": (_append("events.csv", b"0.1,3,replan,x," + b"y" * (128 * 1024 + 1) + b"\n"),
                  "events.csv: row "),
    "no_column": (lambda d: (d / "placements.csv").write_text(
        (d / "placements.csv").read_text().replace("token,block,device", "token,block,devise", 1)),
        "placements.csv: row 1: no column 'device' (its header: token,block,devise)"),
    "inf_token_id": (_set_cell("tokens.csv", "token_id", "inf"),
                     "tokens.csv: row 3, column 'token_id': 'inf' is not an integer"),
}


def refused_copies(src: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a spoiled copy of run `src` under root, the error line it must give)."""
    out = {}
    for name, (spoil, message) in REFUSED.items():
        d = root / name
        shutil.copytree(src, d)
        spoil(d)
        out[name] = (d, f"{d}/{message}")
    return out


def infinite_copy(src: Path, dst: Path) -> Path:
    """A copy whose latencies include inf and -inf (numbers: read, and drawn cut)."""
    shutil.copytree(src, dst)

    def edit(rows: list[dict[str, str]]) -> None:
        rows[2]["latency_ms"] = "inf"
        rows[3]["predicted_ms"] = "-inf"
        rows[3]["stall_ms"] = "inf"
    _edit_csv(dst / "tokens.csv", edit)
    return dst
