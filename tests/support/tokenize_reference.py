"""``Tokenizer.encode_chat`` as it was before its piece cache (issue 16): every call copies the
client's strings with special-token text swapped for placeholders, compiles a pattern for its
nonce, and encodes every piece. Kept as the reference the current one must agree with, id for
id (tests/unit/test_tokenizer.py), and as the "before" of bench/tokenize_bench.py."""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from core.tokenizer import Tokenizer, _map_strings


def encode_chat_uncached(tok: Tokenizer, messages: Sequence[Mapping[str, Any]],
                         tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    if tok._special_re is None:
        return tok.encode(tok.apply_chat_template(messages, tools), add_special_tokens=False)
    nonce = "\ue000" + secrets.token_hex(8)
    index = {text: str(i) for i, text in enumerate(tok._special_texts)}
    pattern = tok._special_re

    def defuse(text: str) -> str:
        return pattern.sub(lambda m: f"{nonce}:{index[m.group(0)]}\ue001", text)
    rendered = tok.apply_chat_template(
        _map_strings(messages, defuse),
        _map_strings(tools, defuse) if tools is not None else None)

    restore = re.compile(re.escape(nonce) + r":(\d+)\ue001")
    texts = tok._special_texts
    pieces, markers = tok._cut_at_special_tokens(rendered)  # unchanged by issue 16
    pieces = [restore.sub(lambda m: texts[int(m.group(1))], piece) for piece in pieces]
    nonempty = [piece for piece in pieces if piece]
    encoded = iter(tok._text_backend.encode_batch_fast(
        nonempty, add_special_tokens=False) if nonempty else ())
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(next(encoded).ids)
        if i < len(markers):
            ids.append(markers[i])
    return ids
