"""Background load: co-tenants that take a share of every device's memory and compute,
changing at every token (pure: numpy, no asyncio, no torch).

Owns the scenario's optional `background_load` section and what it resolves to: per
device and token, the share of its memory (of `memory_mib`) and of its compute (of its
rate after `set_compute` factors) that a co-tenant holds. A share is a constant, a series
(one value per token, the last one holding after the series ends) or a distribution drawn
anew at every token from the scenario's seed (`{uniform: [lo, hi]}`). The first
`before_tokens` values of every share come before token 0 (the prefill): the co-tenants
ran before generation started, and a controller that plans on a window of past tokens
(`controller.window_tokens`) has watched them. The emulator applies the shares before
every token (testbed/experiments/run.py, testbed/harness/world.py); the sweep's instances
convert to this section exactly (testbed/analytic/simulate.py, `instance_to_scenario`).

Parsing takes the scenario loader's reader (`ScenarioError` with key paths), so this
section reads like the rest of the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

RESOURCES = ("memory", "compute")
SECTION = "background_load"
MAX_BEFORE = 1 << 20  # background_load.before_tokens (as a context)
# the section's keys, part of the loader's one table (scenario.format.KEYS); a share given as a
# distribution is a mapping of its own wherever a share may stand
KEYS: dict[str, tuple[str, ...]] = {
    SECTION: ("before_tokens", "default", "devices"),
    f"{SECTION}.default": RESOURCES,
    f"{SECTION}.devices[]": ("device", *RESOURCES),
    **{f"{SECTION}.{where}.{r}": ("uniform",) for where in ("default", "devices[]") for r in RESOURCES},
}
STREAM = 0xB6  # keeps the load's draws apart from every other use of the scenario seed


class Reader(Protocol):
    """What this section needs of the scenario loader's reader (scenario.format.FormatReader)."""

    def fail(self, path: str, message: str) -> Any: ...
    def section(self, value: object, path: str, sections: str | tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict: ...
    def string(self, value: object, path: str) -> str: ...
    def list_(self, value: object, path: str) -> list: ...
    def int_(self, value: object, path: str, ge: int | None = None, le: int | None = None) -> int: ...
    def number(self, value: object, path: str, gt: float | None = None, ge: float | None = None) -> float: ...


@dataclass(frozen=True)
class Share:
    """A share over tokens: exactly one of `constant`, `series`, `uniform` is set."""

    constant: float | None = None
    series: tuple[float, ...] | None = None
    uniform: tuple[float, float] | None = None

    def values(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """The first n values (a series shorter than n holds its last value)."""
        if self.uniform is not None:
            return rng.uniform(self.uniform[0], self.uniform[1], n)
        if self.series is not None:
            s = np.asarray(self.series, dtype=float)
            return s[np.minimum(np.arange(n), len(s) - 1)]
        return np.full(n, self.constant or 0.0)

    def to_data(self) -> float | list[float] | dict[str, list[float]]:
        if self.uniform is not None:
            return {"uniform": list(self.uniform)}
        if self.series is not None:
            return list(self.series)
        return self.constant or 0.0


NONE = Share(constant=0.0)


@dataclass(frozen=True)
class DeviceLoad:
    memory: Share = NONE
    compute: Share = NONE

    def to_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.to_data(), "compute": self.compute.to_data()}


@dataclass(frozen=True)
class BackgroundLoad:
    before_tokens: int = 0
    default: DeviceLoad = DeviceLoad()  # devices without an entry of their own
    devices: dict[str, DeviceLoad] = field(default_factory=dict)

    def of(self, name: str) -> DeviceLoad:
        return self.devices.get(name, self.default)

    def table(self, seed: int, names: Sequence[str], new_tokens: int) -> dict[str, np.ndarray]:
        """name -> [before_tokens + new_tokens, 2] shares (memory, compute); row
        `before_tokens + k` is token k. Draws are per device and resource, so a device's
        values do not depend on the others' or on how many tokens the run has."""
        n = self.before_tokens + new_tokens
        out = {}
        for i, name in enumerate(names):
            load = self.of(name)
            cols = [getattr(load, r).values(n, np.random.default_rng([seed, STREAM, i, j]))
                    for j, r in enumerate(RESOURCES)]
            out[name] = np.stack(cols, axis=1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"before_tokens": self.before_tokens, "default": self.default.to_dict(),
                "devices": [{"device": n, **d.to_dict()} for n, d in self.devices.items()]}


def parse(r: Reader, value: object, names: Sequence[str]) -> BackgroundLoad:
    """The section, given the names of the declared devices (the load applies to them)."""
    m = r.section(value, SECTION, SECTION)
    # bounded like a context: the emulator draws a table of before_tokens + new_tokens rows
    before = r.int_(m.get("before_tokens", 0), f"{SECTION}.before_tokens", ge=0, le=MAX_BEFORE)
    default = _device(r, m["default"], f"{SECTION}.default", "default") if "default" in m else DeviceLoad()
    devices: dict[str, DeviceLoad] = {}
    where: dict[str, int] = {}
    for i, item in enumerate(r.list_(m.get("devices", []), f"{SECTION}.devices")):
        p = f"{SECTION}.devices[{i}]"
        name = r.string(r.section(item, p, f"{SECTION}.devices[]", ("device",))["device"], f"{p}.device")
        if name not in names:
            r.fail(f"{p}.device", f"unknown device {name!r} (the load applies to the declared devices: "
                   f"{', '.join(names)})")
        if name in devices:
            r.fail(f"{p}.device", f"{name!r} already has its load in {SECTION}.devices[{where[name]}]")
        devices[name], where[name] = _device(r, item, p, "devices[]"), i
    return BackgroundLoad(before, default, devices)


def _device(r: Reader, value: object, path: str, section: str) -> DeviceLoad:
    m = r.section(value, path, f"{SECTION}.{section}")
    return DeviceLoad(**{k: _share(r, m[k], f"{path}.{k}", f"{SECTION}.{section}.{k}") for k in RESOURCES if k in m})


def _share(r: Reader, value: object, path: str, section: str) -> Share:
    if isinstance(value, dict):
        m = r.section(value, path, section, ("uniform",))
        bounds = r.list_(m["uniform"], f"{path}.uniform")
        if len(bounds) != 2:
            r.fail(f"{path}.uniform", f"must be [low, high], got {len(bounds)} values")
        lo, hi = (_fraction(r, v, f"{path}.uniform[{k}]") for k, v in enumerate(bounds))
        if lo > hi:
            r.fail(f"{path}.uniform", f"low must be <= high, got [{lo:g}, {hi:g}]")
        return Share(uniform=(lo, hi))
    if isinstance(value, list):
        if not value:
            r.fail(path, "a series needs at least one value")
        return Share(series=tuple(_fraction(r, v, f"{path}[{k}]") for k, v in enumerate(value)))
    return Share(constant=_fraction(r, value, path))


def _fraction(r: Reader, value: object, path: str) -> float:
    """A share of a device: from 0 up to, not including, 1 (a device must keep some)."""
    x = r.number(value, path, ge=0)
    if x >= 1:
        r.fail(path, f"must be < 1 (a share of the device), got {x:g}")
    return x
