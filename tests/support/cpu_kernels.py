"""Helpers for tests of the engine's CPU kernels (workers/kernels)."""

from __future__ import annotations

from workers import kernels


def spy_on_kernel(monkeypatch, name: str) -> list:
    """Every caller of ``kernels.cpu()`` gets the real module, with calls of ``name`` recorded
    (the first argument's shape) in the list returned."""
    calls, real = [], kernels.cpu()

    class Spy:
        def __getattr__(self, attr):
            fn = getattr(real, attr)
            if attr != name:
                return fn

            def call(*args):
                calls.append(args[0].shape)
                return fn(*args)
            return call

    monkeypatch.setattr(kernels, "cpu", lambda: Spy())
    return calls
