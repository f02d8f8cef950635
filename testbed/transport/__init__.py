"""Transports between device agents: in-process queues and websockets (aiohttp), both
shaping frames through the emulated links, with one msgpack codec.

Owns moving frames: encoding, size limits, authentication, delivery times; nothing here
knows what messages mean. May import `testbed.emulation`, the scenario's `LinkSpec`, msgpack,
aiohttp and torch (tensors in frames); never imports agents, harness or placement.
"""
