"""Which process holds which TCP connections, read from /proc (Linux): how the kernel spread a
port's connections over the processes listening on it (SO_REUSEPORT)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def established(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01" \
                    and cols[9] in inodes:
                count += 1
    return count
