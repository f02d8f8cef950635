"""The wire codec: every message round-trips exactly (a property over plain values, nesting
and tensors of every wire dtype); malformed, oversized or unexpected frames are refused
with FrameError (never another exception, never pickle)."""

from __future__ import annotations

import math

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.transport.codec import MAX_DIMS, WIRE_DTYPES, EncodeOnce, FrameError, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 100).to(dtype)
    m = decode(encode({"t": "x", "seq": 1, "x": t, "nested": {"w": t[:1]}}))
    assert m["x"].dtype == dtype and torch.equal(m["x"], t) and torch.equal(m["nested"]["w"], t[:1])
    m["x"].add_(1)  # decoded tensors own writable memory


def test_refuses_bad_frames() -> None:
    good = {"dtype": "float32", "shape": [2], "data": b"\0" * 8}
    cases = [
        b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"no_type": 1}),
        msgpack.packb({"t": 5}),
        msgpack.packb({"t": "x", "x": {**good, "dtype": "object"}}),
        msgpack.packb({"t": "x", "x": {**good, "shape": [3]}}),
        msgpack.packb({"t": "x", "x": {**good, "shape": [-1]}}),
        msgpack.packb({"t": "x", "x": {**good, "shape": [1, 1, 1, 1, 2]}}),
        msgpack.packb({"t": "x", "x": {**good, "data": "text"}}),
    ]
    for frame in cases:
        with pytest.raises(FrameError):
            decode(frame)
    with pytest.raises(FrameError):
        decode(encode({"t": "x", "pad": b"\0" * 1000}), max_size=100)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        decode(data)
    except FrameError:
        pass


# ---------------------------------------------------------------- round trip, as a property

_SIZES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any wire dtype, 0 to 4 dimensions (empty ones too), any bit pattern (NaNs, infinities,
    subnormals), sometimes not contiguous."""
    name = draw(st.sampled_from(sorted(WIRE_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=MAX_DIMS))
    n = math.prod(shape)
    raw = draw(st.binary(min_size=n * _SIZES[name], max_size=n * _SIZES[name]))
    t = torch.frombuffer(bytearray(raw), dtype=WIRE_DTYPES[name][0]) if raw else \
        torch.empty(0, dtype=WIRE_DTYPES[name][0])
    t = t.reshape(shape)
    if len(shape) >= 2 and draw(st.booleans()):
        t = t.transpose(0, 1)  # a strided view: sent as its values in logical order
    return t


_plain = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats() \
    | st.text(max_size=20) | st.binary(max_size=40)
_keys = st.text(max_size=8).filter(lambda k: k not in ("dtype", "shape", "data"))
values = st.recursive(_plain | tensors(), lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(_keys, inner, max_size=4), max_leaves=12)


def _same(a: object, b: object) -> bool:
    """Equal values; tensors equal in dtype, shape and every bit; NaN equals NaN."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=300, deadline=None)
@given(t=st.text(min_size=1, max_size=3), fields=st.dictionaries(_keys.filter(lambda k: k != "t"), values,
                                                                  max_size=5))
def test_every_message_round_trips_exactly(t: str, fields: dict[str, object]) -> None:
    """decode(encode(m)) == m for any message of plain values, nested lists and maps, and
    tensors of every wire dtype and shape, bit for bit."""
    msg = {"t": t, **fields}
    back = decode(encode(msg))
    assert _same(msg, back), (msg, back)


def test_a_message_sent_to_several_devices_is_encoded_once() -> None:
    calls: list[dict[str, object]] = []

    def counted(msg: dict[str, object]) -> bytes:
        calls.append(msg)
        return encode(msg)

    once = EncodeOnce(counted)
    msg = {"t": "x", "x": torch.arange(6, dtype=torch.float32)}
    frames = [once(msg) for _ in range(3)]  # one hidden state to three devices
    assert len(calls) == 1 and frames[0] == frames[1] == frames[2] == encode(msg)
    same = dict(msg)  # an equal but new message is a new frame
    assert once(same) == frames[0] and len(calls) == 2
