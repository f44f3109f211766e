"""``python -m workers.kernels``: builds the CPU kernels now (``make install`` runs it)."""

import logging

from workers.kernels import cpu

logging.basicConfig(level=logging.INFO)
print("CPU kernels:", "built" if cpu() is not None else
      "NOT built (the engine's torch paths serve instead)")
