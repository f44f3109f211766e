"""The worker package bounds what glibc's malloc keeps after large blocks are freed, and lets
a CPU step reuse its own freed blocks (workers/malloc.py)."""

from __future__ import annotations

import json
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

# A step's pattern: layer after layer, blocks of a few MiB made and freed (each zero-filled,
# so every page is touched). Page faults counted inside the step; RSS after it (its top
# trimmed as it ends).
STEP_PROGRAM = """
import json
import workers
from workers import malloc

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

def minor_faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

def layers():
    for _ in range(30):
        a, b = bytearray(6 << 20), bytearray(3 << 20)
        del a, b

base = rss_mib()
faults = minor_faults()
layers()
outside = minor_faults() - faults
with malloc.step_heap():
    faults = minor_faults()
    layers()
    inside = minor_faults() - faults
print(json.dumps({"outside": outside, "inside": inside, "held_mib": rss_mib() - base}))
"""


def _run(program: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_large_blocks_go_back_to_the_os():
    # glibc's dynamic threshold alone keeps the later blocks in the heap: ~24 MiB held.
    assert float(_run(PROGRAM)) < 4.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_a_step_reuses_its_freed_blocks_and_gives_them_back_after():
    seen = json.loads(_run(STEP_PROGRAM))
    pages = (9 << 20) // 4096
    # Between steps each block is a fresh mapping: every page of every layer faulted in.
    assert seen["outside"] > 25 * pages, seen
    # Inside one, the first layer's pages serve the other 29.
    assert seen["inside"] < 3 * pages, seen
    assert seen["held_mib"] < 4.0, seen
