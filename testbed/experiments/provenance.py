"""Where a result came from: the code's revision and the time, as meta.json and the
reference results record them.

Owns `git_revision` (the short commit, `+dirty` when tracked files differ from it;
"unknown" outside a git checkout) and `utc_now` (ISO 8601, microseconds, UTC).
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
