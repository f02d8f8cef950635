"""Why an attempt or a run stops (shared by the controller and its mixins)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ProtocolError(Exception):
    """A message that the receiver cannot accept (unknown kind, missing or bad field, a
    sender that may not send it, a buffer that is full). Raised by messages.py's checks."""


class RunFailed(Exception):
    """The run cannot go on; the message says why (recorded as `failed: <message>`).
    `error`, when given, is kept in meta.json as `error` (e.g. a plug-in's traceback)."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error


class OutOfMemory(Exception):
    """A device refused a token's job: running it would cross its memory limit."""

    def __init__(self, device: str, detail: str | None) -> None:
        self.device = device
        super().__init__(detail or "out of memory")


class DeviceLost(Exception):
    def __init__(self, devices: Sequence[str], why: str) -> None:
        self.devices, self.why = list(devices), why
        super().__init__(f"{', '.join(devices)}: {why}")


class Stalled(Exception):
    """A token attempt took far longer than predicted (e.g. a link went down)."""
