"""Helpers for tests of the engine's CPU kernels (workers/kernels)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers import kernels


def recording(real: Any, names: set[str], calls: list,
              entry: Callable[[str, tuple], Any]) -> Any:
    """A stand-in for the kernels' module ``real``: calls of ``names`` go through, each
    recorded in ``calls`` as ``entry(name, args)``; everything else is ``real``'s."""

    class Spy:
        def __getattr__(self, attr):
            fn = getattr(real, attr)
            if attr not in names:
                return fn

            def call(*args):
                calls.append(entry(attr, args))
                return fn(*args)
            return call

    return Spy()


def spy_on_kernel(monkeypatch, name: str) -> list:
    """Every caller of ``kernels.cpu()`` gets the real module, with calls of ``name`` recorded
    (the first argument's shape) in the list returned."""
    calls: list = []
    spy = recording(kernels.cpu(), {name}, calls, lambda _, args: args[0].shape)
    monkeypatch.setattr(kernels, "cpu", lambda: spy)
    return calls
