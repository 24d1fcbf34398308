"""Length-prefixed messages on a pipe: how the sandbox talks to its child and rank 0 to rank 1."""
from __future__ import annotations

import os
import select
import struct
import time

HEADER = struct.Struct("!Q")


def write_frame(fd: int, data: bytes) -> None:
    """``data`` as one message: its length, then its bytes (all of them, however the pipe splits them)."""
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def read_exactly(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None on end of file; raises TimeoutError past ``deadline``."""
    chunks, left = [], n
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, deadline: float | None) -> bytes | None:
    """The next message's bytes; None once the writer has ended (before or within it)."""
    header = read_exactly(fd, HEADER.size, deadline)
    if header is None:
        return None
    return read_exactly(fd, HEADER.unpack(header)[0], deadline)
