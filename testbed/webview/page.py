"""The page: one HTML document with its stylesheet and script inline.

Owns putting static/view.html, view.css and view.js together, with or without the data.
Served (`data` None) the script reads `/api/state` and `/api/stream`; in a report the state
is inline as JSON and nothing is fetched, so the file works offline and attached to an
issue. The charts are plain SVG drawn by the script (no library: the views are a line
chart, a grid and bars, and a charting library would put megabytes of script into every
report; no build step either, the files are served as written).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

_DATA_MARK = "<!--DATA-->"


@cache
def _asset(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


def inline_json(data: Any) -> str:
    """JSON safe inside a <script> element: no `</` to end it early, no `<!--`."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def render(data: Any | None = None, title: str = "testbed view") -> str:
    """The page; with `data` (a Feed snapshot) inline, for a self-contained file."""
    html = _asset("view.html")
    html = html.replace("/*CSS*/", _asset("view.css")).replace("/*JS*/", _asset("view.js"))
    html = html.replace("<!--TITLE-->", _escape(title))
    inline = "" if data is None else f'<script type="application/json" id="data">{inline_json(data)}</script>'
    return html.replace(_DATA_MARK, inline)


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
