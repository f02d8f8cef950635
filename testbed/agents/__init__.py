"""The system under test: the device agent, the controller (composed of its requests,
migration and recovery parts, parts.py), its telemetry beliefs and the message protocol
between them.

Owns what would run on real edge devices: executing blocks, answering the controller,
deciding and applying placements (under `testbed.placement.policy`). It may import the emulation primitives (clock-agnostic: it reads only the loop's time),
the model, placement and scenario types; it never imports the harness (`testbed.harness`),
which builds and drives it.
"""
