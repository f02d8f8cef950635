"""Wire format: msgpack frames, tensors as `{dtype, shape, data}` maps. Never pickle.

Owns encoding and strict decoding of every message agents exchange. A message is a map
with a string `t` (its type) and plain values; tensors (torch or numpy) become
`{"dtype": "float32", "shape": [..], "data": <bytes>}`. Decoding checks what it is given:
the frame size against a limit, the top level a map with a known type, and every tensor's
dtype, shape and byte length, before anything is built from it. Both transports (inproc and
ws) use this codec, so the emulated links charge the same encoded bytes.
Pure: no IO, no asyncio.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import torch

MAX_FRAME = 256 * 1024 * 1024  # bytes; a frame larger than this is refused

WIRE_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, None),
    "int64": (torch.int64, np.int64),
    "int32": (torch.int32, np.int32),
}
_TORCH_TO_NAME = {v[0]: k for k, v in WIRE_DTYPES.items()}
TENSOR_KEYS = frozenset(("dtype", "shape", "data"))
MAX_DIMS = 4


class FrameError(ValueError):
    """A frame that is malformed, oversized or not what the receiver accepts."""


def _default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous()
        name = _TORCH_TO_NAME.get(t.dtype)
        if name is None:
            raise TypeError(f"cannot send tensors of dtype {t.dtype}")
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return {"dtype": name, "shape": list(t.shape), "data": raw.numpy().tobytes()}
    if isinstance(obj, np.ndarray):
        return _default(torch.from_numpy(np.ascontiguousarray(obj)))
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def encode(msg: dict[str, Any]) -> bytes:
    frame = msgpack.packb(msg, default=_default, use_bin_type=True)
    if len(frame) > MAX_FRAME:
        raise FrameError(f"frame of {len(frame)} B exceeds the limit of {MAX_FRAME} B")
    return frame


class EncodeOnce:
    """`encode` (or `fn`) that encodes a message once however many destinations it goes to:
    a device sends one hidden state to every device of the next layer as the same map. It
    keeps the last message and its frame; a message is never changed after it is sent."""

    def __init__(self, fn: Callable[[dict[str, Any]], bytes] = encode) -> None:
        self._fn = fn
        self._msg: dict[str, Any] | None = None
        self._frame = b""

    def __call__(self, msg: dict[str, Any]) -> bytes:
        if msg is not self._msg:
            self._frame = self._fn(msg)
            self._msg = msg
        return self._frame


def _tensor(d: dict[str, Any]) -> torch.Tensor:
    dtype, shape, data = d["dtype"], d["shape"], d["data"]
    if dtype not in WIRE_DTYPES:
        raise FrameError(f"tensor dtype {dtype!r} not accepted")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape)):
        raise FrameError(f"bad tensor shape {shape!r}")
    if not isinstance(data, bytes):
        raise FrameError("tensor data must be bytes")
    tdtype = WIRE_DTYPES[dtype][0]
    itemsize = tdtype.itemsize
    if math.prod(shape) * itemsize != len(data):
        raise FrameError(f"tensor of shape {shape} and dtype {dtype} needs "
                         f"{math.prod(shape) * itemsize} B, got {len(data)} B")
    if not data:
        return torch.empty(shape, dtype=tdtype)
    if tdtype == torch.bfloat16:
        return torch.frombuffer(bytearray(data), dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(bytearray(data), dtype=tdtype).reshape(shape)


def _hook(d: dict[Any, Any]) -> Any:
    if d.keys() == TENSOR_KEYS:
        return _tensor(d)
    return d


def decode(frame: bytes, max_size: int = MAX_FRAME) -> dict[str, Any]:
    """Frame -> message with tensors; FrameError on anything malformed."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise FrameError(f"frame must be bytes, got {type(frame).__name__}")
    if len(frame) > max_size:
        raise FrameError(f"frame of {len(frame)} B exceeds the limit of {max_size} B")
    try:
        msg = msgpack.unpackb(frame, object_hook=_hook, raw=False, strict_map_key=True,
                              max_bin_len=max_size, max_str_len=1 << 20,
                              max_array_len=1 << 20, max_map_len=1 << 20)
    except FrameError:
        raise
    except Exception as e:  # msgpack raises many types on garbage
        raise FrameError(f"undecodable frame: {type(e).__name__}: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("t"), str):
        raise FrameError("a frame must be a map with a string 't' (message type)")
    return msg
