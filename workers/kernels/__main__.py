"""``python -m workers.kernels``: builds the CPU kernels now (``make install`` runs it)."""

import logging

from workers.kernels import paged_decode

logging.basicConfig(level=logging.INFO)
print("paged_decode:", "built" if paged_decode() is not None else
      "NOT built (the engine's torch path serves instead)")
