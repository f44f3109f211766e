"""Triton's interpreter (``TRITON_INTERPRET=1``) as the GPU tests and the kernel benchmark's
CPU check need it.

The interpreter holds a scalar loaded from memory as a 1-element array, which numpy 2 no
longer converts with ``int()``: a loop bound read from memory (a context length) then fails.
``patch()`` gives such tensors an ``__index__`` that takes the element; it is idempotent.
"""

from __future__ import annotations

_patched = False


def patch() -> None:
    global _patched
    if _patched:
        return
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def scalar_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = scalar_index
    _patched = True
