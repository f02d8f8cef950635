"""The wire codec: tensors round-trip exactly; malformed, oversized or unexpected frames are
refused with FrameError (never another exception, never pickle)."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.transport.codec import EncodeOnce, FrameError, decode, encode


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
