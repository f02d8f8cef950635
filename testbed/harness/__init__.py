"""The emulation harness: the world the system under test runs in.

Owns the clusters that build and drive a run's devices and links (in process, over
websockets, as agent processes or attached agents), how scenario events act on them, and
the agent server that hosts one device agent in its own process; all of them behind one
declared interface, `interface.World`, which is all a run (testbed/experiments/run.py) uses. It
may import the system
under test (`testbed.agents`), the emulation primitives, transports, model, placement
types and scenario, never the run that drives it (`testbed.experiments.run`); the system under
test never imports it.
"""
