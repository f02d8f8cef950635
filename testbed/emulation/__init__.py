"""Emulation primitives: the one clock (real, dilated, or virtual), token-bucket links with
latency, compute units and cgroup-like memory budgets.

Owns how emulated time passes and what a device's resources do; knows nothing of the
model's meaning or the controller. May import the standard library and the scenario's
types (`LinkSpec`, `MAX_TIME_SCALE`); `bucket` is pure (no asyncio); the rest read time
only from the asyncio loop. Never imports agents, harness, placement or runners.
"""
