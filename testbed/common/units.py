"""Units the scenario format speaks (MiB, KiB, Mbit/s) against the ones the emulation
computes in (bytes, bytes per second), and the default soft memory limit.

Links are given in Mbit/s (10^6 bits) and computed in bytes per second; memory is given
in MiB (2^20 bytes); a device's soft limit (`memory_high_mib`, cgroup v2's `memory.high`)
defaults to 90 % of its hard limit. Pure arithmetic.
"""

from __future__ import annotations

KIB = 1024
MIB = 1024 * 1024
DEFAULT_HIGH_SHARE = 0.9  # memory.high as a share of memory.max when a scenario gives none


def mbps_to_bytes(mbps: float) -> float:
    """Mbit/s to bytes per second."""
    return mbps * 1e6 / 8


def bytes_to_mbps(rate: float) -> float:
    """Bytes per second to Mbit/s."""
    return rate * 8 / 1e6
