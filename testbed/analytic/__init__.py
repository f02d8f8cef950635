"""The paper's experiments without the emulator: families of random instances in the
paper's style and the analytic simulation of a generation run on one of them.

Owns `simulate` (instances, their conversion to scenarios, the analytic per-token latency).
Pure core: numpy only; it may import `placement` and `model` (testbed.LAYERS), never asyncio
or torch. The runs that check it against the emulator, and its report, are `experiments`'.
"""
