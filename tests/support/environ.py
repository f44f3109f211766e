"""Environment variables a test changes (or lets Ray change: ``start_local_ray`` exports
``RAY_AUTH_MODE`` and ``PYTHONPATH``), put back as they were afterwards."""

from __future__ import annotations

import os


class SavedEnviron:
    """The values of ``keys`` now; ``restore()`` sets them back (unset ones are removed)."""

    def __init__(self, *keys: str):
        self._saved = {k: os.environ.get(k) for k in keys}

    def restore(self) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
