"""Reading a file given by a user, or found in a shared directory, without trusting it: a
regular file only (never a FIFO, a device or a directory), opened so that nothing blocks and
checked on the open descriptor (a file swapped for another kind between a look and the open
is still refused), read up to a limit, decoded as UTF-8 with the place of a bad byte.

Owns `open_regular`, `read_limited` and `utf8`, and `FileRefused`, whose message says why in
words a user reads after the file's name (it holds no path: each caller names the file its
own way). Used by the scenario and experiment loaders, the GGUF header check and the readers
of run directories. No asyncio.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class FileRefused(ValueError):
    """A file that cannot be read as asked; the message says why, without its path."""


def kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str | os.PathLike, what: str) -> BinaryIO:
    """The file opened for reading if it is a regular file, else FileRefused (`what` names
    what it should have been: "a scenario file")."""
    try:
        fd = os.open(path, _FLAGS)
    except FileNotFoundError:
        raise FileRefused("no such file") from None
    except IsADirectoryError:
        raise FileRefused(f"is a directory, not {what}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise FileRefused("symlink loop (too many levels of symbolic links)") from None
        raise FileRefused(f"cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileRefused(f"is a directory, not {what}")
        if not stat.S_ISREG(mode):
            raise FileRefused(f"is {kind(mode)}, not a regular file (refused)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(path: str | os.PathLike, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (else FileRefused, having read
    no more than `limit` + 1 of them)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileRefused(f"{size} bytes, larger than the limit of {limit} bytes for {what}")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise FileRefused(f"cannot read: {e.strerror or e}") from None
    if len(data) > limit:  # it grew while we read
        raise FileRefused(f"larger than the limit of {limit} bytes for {what}")
    return data


def utf8(data: bytes) -> str:
    """The text of `data`, else FileRefused naming the line and the offset of the first
    byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FileRefused(f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
