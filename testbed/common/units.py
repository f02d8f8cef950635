"""Units the scenario format speaks (MiB, KiB, Mbit/s) against the ones the emulation
computes in (bytes, bytes per second), and the default soft memory limit.

Links are given in Mbit/s (10^6 bits) and computed in bytes per second; memory is given
in MiB (2^20 bytes); a device's soft limit (`memory_high_mib`, cgroup v2's `memory.high`)
defaults to 90 % of its hard limit. Pure arithmetic.
"""

from __future__ import annotations

import math

KIB = 1024
MIB = 1024 * 1024
DEFAULT_HIGH_SHARE = 0.9  # memory.high as a share of memory.max when a scenario gives none


def mbps_to_bytes(mbps: float) -> float:
    """Mbit/s to bytes per second."""
    return mbps * 1e6 / 8


def bytes_to_mbps(rate: float) -> float:
    """Bytes per second to Mbit/s."""
    return rate * 8 / 1e6


MEASURED_DIGITS = 9  # significant digits an emulated measurement keeps


def measured(x: float) -> float:
    """An emulated measurement (a rate, a latency) to MEASURED_DIGITS significant digits.
    It is computed from differences of loop times, whose rounding depends on the clock's
    absolute values (the virtual clock counts from 0, the real one from the host's
    monotonic clock): the digits beyond are float noise, and a decision that compares two
    measurements must not hinge on them (a real-clock run would then break a tie
    differently from its virtual twin)."""
    return float(f"{x:.{MEASURED_DIGITS}g}") if math.isfinite(x) else x
