"""The system under test: the device agent, the controller (with its migration and recovery
parts), its telemetry beliefs and the message protocol between them.

It may import the emulation primitives (clock-agnostic: it reads only the loop's time),
the model, placement and scenario types; it never imports the harness (`testbed.harness`),
which builds and drives it.
"""
