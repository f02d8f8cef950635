"""The checks a GGUF file passes before the `gguf` library's reader sees it.

Owns `open_regular` (a path that is a regular file, opened without blocking: no FIFO,
device or directory; a symlink loop is one line) and `check_header` (a bounded walk over
the header: every count, length, type, dimension and offset is checked against the bytes
left in the file and the limits below before anything is read at it, and every tensor must
lie inside the data section, aligned, without overlapping another).

Why here: `gguf.GGUFReader` trusts the header. It loops `count` times over an array whose
count is 2^62 (reading empty slices past the end, its lists growing without bound), and it
adds a tensor's offset to the data start in 64-bit unsigned arithmetic, so an offset of
2^64-1 wraps to weights shifted into the header. The reader cannot be told to check first,
so this module checks, in Python integers (no wrap-around), and the reader only ever opens
a file that passed.

Pure: struct and mmap over an open file, no numpy, no asyncio. The ggml type sizes come
from the `gguf` package when it is installed (`type_sizes`), so both agree on nbytes.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from ..common import files

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# limits well above any published model (llama.cpp: names under 64 bytes, at most 4 dims)
MAX_TENSORS = 1 << 20
MAX_KEYS = 1 << 20
MAX_ARRAY_ITEMS = 1 << 24  # vocabularies and merges are under a million
MAX_ARRAY_DEPTH = 2  # an array of arrays at most
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 63
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16

# GGUF metadata value types: id -> (name, struct code or None)
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
MIN_ITEM = {**{t: struct.calcsize(c) for t, c in SCALARS.items()}, STRING: 8, ARRAY: 12}
KIND_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
              7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


class HeaderError(ValueError):
    """One line naming the field of the header that is wrong (the caller adds the file)."""


@dataclass(frozen=True)
class Header:
    """What the walk found: enough for the caller to compare with the reader's view."""

    version: int
    big_endian: bool
    keys: int
    tensors: int
    alignment: int
    data_offset: int
    size: int


def type_sizes() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, values per block, bytes per block), from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (t.name, int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """The file opened for reading if it is a regular file, else HeaderError (common/files.py:
    a FIFO never blocks, a symlink loop is one line)."""
    try:
        return files.open_regular(path, "a GGUF file")
    except files.FileRefused as e:
        raise HeaderError(str(e)) from None


class _Cursor:
    """Reads little- or big-endian values at a position, refusing to pass the end."""

    def __init__(self, buf: mmap.mmap | bytes, big_endian: bool) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)
        self.order = ">" if big_endian else "<"

    def left(self) -> int:
        return self.size - self.pos

    def take(self, code: str, what: str) -> int | float | bool:
        n = struct.calcsize(code)
        if n > self.left():
            raise HeaderError(f"{what}: the file ends inside it (offset {self.pos}, {self.left()} bytes left)")
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += n
        return value

    def uint(self, code: str, what: str) -> int:
        value = self.take(code, what)
        assert isinstance(value, int)
        return value

    def string(self, what: str, limit: int | None = None) -> bytes:
        n = self.uint("Q", f"{what} length")
        if limit is not None and n > limit:
            raise HeaderError(f"{what}: length {n} exceeds the limit of {limit} bytes")
        if n > self.left():
            raise HeaderError(f"{what}: length {n} runs past the end of the file ({self.left()} bytes left)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw

    def skip(self, n: int) -> None:
        self.pos += n


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderError(f"{what}: not UTF-8 (byte {e.start})") from None


def _value(c: _Cursor, kind: int, what: str, depth: int = 0) -> int | None:
    """Skip one metadata value of `kind`; return it if it is an unsigned 32-bit integer."""
    if kind in SCALARS:
        code = SCALARS[kind]
        value = c.take(code, what)
        return value if kind == 4 and isinstance(value, int) else None
    if kind == STRING:
        c.string(what)
        return None
    if kind != ARRAY:
        raise HeaderError(f"{what}: unknown value type {kind}")
    if depth >= MAX_ARRAY_DEPTH:
        raise HeaderError(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH}")
    item = c.uint("I", f"{what} item type")
    if item not in MIN_ITEM:
        raise HeaderError(f"{what}: unknown array item type {item}")
    count = c.uint("Q", f"{what} count")
    if count > MAX_ARRAY_ITEMS:
        raise HeaderError(f"{what}: array of {count} items exceeds the limit of {MAX_ARRAY_ITEMS}")
    if count * MIN_ITEM[item] > c.left():
        raise HeaderError(f"{what}: array of {count} {KIND_NAMES[item]} items does not fit in the "
                          f"{c.left()} bytes left of the file")
    if item in SCALARS:
        c.skip(count * MIN_ITEM[item])
        return None
    if item == STRING:  # vocabularies: a tight loop (each length checked against the end)
        for i in range(count):
            n = c.uint("Q", f"{what}[{i}] length")
            if n > c.left():
                raise HeaderError(f"{what}[{i}]: length {n} runs past the end of the file ({c.left()} bytes left)")
            c.skip(n)
        return None
    for i in range(count):
        _value(c, item, f"{what}[{i}]", depth + 1)
    return None


def check_header(buf: mmap.mmap | bytes, sizes: Mapping[int, tuple[str, int, int]]) -> Header:
    """Walk a whole GGUF header in `buf` (the file's bytes); HeaderError at the first field
    that is out of bounds, malformed or inconsistent. `sizes` is `type_sizes()`."""
    size = len(buf)
    if size < 8 or bytes(buf[:4]) != MAGIC:
        raise HeaderError("not a GGUF file (bad magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    big = version & 0xFFFF == 0  # written on a big-endian host, as the gguf reader detects
    c = _Cursor(buf, big)
    c.skip(4)
    version = c.uint("I", "GGUF version")
    if version not in VERSIONS:
        raise HeaderError(f"GGUF version {version} is not supported (supported: {', '.join(map(str, VERSIONS))})")
    n_tensors = c.uint("Q", "tensor count")
    n_keys = c.uint("Q", "metadata count")
    if n_keys > MAX_KEYS or n_keys * (8 + 4 + 1) > c.left():
        raise HeaderError(f"metadata count: {n_keys} entries cannot fit in the {c.left()} bytes left "
                          f"(limit {MAX_KEYS})")
    if n_tensors > MAX_TENSORS or n_tensors * (8 + 4 + 8 + 4 + 8) > c.left():
        raise HeaderError(f"tensor count: {n_tensors} tensors cannot fit in the {c.left()} bytes left "
                          f"(limit {MAX_TENSORS})")
    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_keys):
        key = _decode(c.string(f"metadata key #{i}", MAX_KEY_BYTES), f"metadata key #{i}")
        if key in keys:
            raise HeaderError(f"metadata {key!r}: appears twice")
        keys.add(key)
        kind = c.uint("I", f"metadata {key!r} type")
        value = _value(c, kind, f"metadata {key!r}")
        if key == "general.alignment":
            if value is None:
                raise HeaderError(f"metadata {key!r}: must be a uint32, not {KIND_NAMES.get(kind, kind)}")
            if value == 0 or value & (value - 1) or value > MAX_ALIGNMENT:
                raise HeaderError(f"metadata {key!r}: {value} is not a power of two up to {MAX_ALIGNMENT}")
            alignment = value
    tensors: list[tuple[int, int, str]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = _decode(c.string(f"tensor #{i} name", MAX_NAME_BYTES), f"tensor #{i} name")
        what = f"tensor {name!r}"
        if name in names:
            raise HeaderError(f"{what}: appears twice")
        names.add(name)
        n_dims = c.uint("I", f"{what} dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise HeaderError(f"{what}: {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = [c.uint("Q", f"{what} dimension {d}") for d in range(n_dims)]
        kind = c.uint("I", f"{what} type")
        offset = c.uint("Q", f"{what} offset")
        if kind not in sizes:
            raise HeaderError(f"{what}: unknown tensor type {kind}")
        tname, block, nbytes_block = sizes[kind]
        elems = 1
        for d in dims:
            if d == 0:
                raise HeaderError(f"{what}: a dimension of 0 (shape {dims})")
            elems *= d
            if elems > size * 8:  # more values than bits in the file: it cannot hold them
                raise HeaderError(f"{what}: shape {dims} is larger than the file")
        if dims[0] % block:
            raise HeaderError(f"{what}: first dimension {dims[0]} is not a multiple of the {tname} "
                              f"block of {block}")
        if offset % alignment:
            raise HeaderError(f"{what}: offset {offset} is not a multiple of the alignment {alignment}")
        tensors.append((offset, elems // block * nbytes_block, name))
    data_offset = -(-c.pos // alignment) * alignment
    end = 0
    for offset, nbytes, name in sorted(tensors):
        if data_offset + offset + nbytes > size:
            raise HeaderError(f"tensor {name!r}: offset {offset} + {nbytes} bytes runs past the end of the "
                              f"file (data {size - min(size, data_offset)} bytes from offset {data_offset})")
        if offset < end:
            raise HeaderError(f"tensor {name!r}: offset {offset} overlaps the tensor before it (ends at {end})")
        end = offset + nbytes
    return Header(version, big, n_keys, n_tensors, alignment, data_offset, size)


def check_file(path: str | os.PathLike,
               sizes: Callable[[], Mapping[int, tuple[str, int, int]]] = type_sizes) -> Header:
    """open_regular, then check_header over the file mapped read-only."""
    with open_regular(path) as f:
        n = os.fstat(f.fileno()).st_size
        if n == 0:
            raise HeaderError("empty file, not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return check_header(m, sizes())
