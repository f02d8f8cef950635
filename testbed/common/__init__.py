"""The few constants and helpers that every layer shares, kept once.

Owns `units` (MiB and KiB, Mbit/s to bytes per second and back, the soft memory limit's
default share of the hard one) and `stats` (the percentile every figure of the project
uses). The bottom layer (testbed.LAYERS): it imports no other package of testbed, and
nothing but the standard library.
"""
