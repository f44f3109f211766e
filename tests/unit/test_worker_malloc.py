"""The worker package bounds what glibc's malloc keeps after large blocks are freed
(workers/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROGRAM = """
import workers  # noqa: F401  (sets the thresholds on import)

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

base = rss_mib()
for size in (32, 24, 16, 12, 8, 6, 4, 3, 2):   # shrinking: each under the last threshold
    block = bytearray(size << 20)               # zero-filled: every page touched
    del block
print(rss_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_large_blocks_go_back_to_the_os():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    # glibc's dynamic threshold alone keeps the later blocks in the heap: ~24 MiB held.
    assert float(done.stdout) < 4.0, done.stdout
