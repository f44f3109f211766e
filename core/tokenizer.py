"""The model's tokenizer and chat template, loaded from a GGUF file or a Hugging Face directory.

No torch and no transformers: the router runs this on CPU-only pods. A GGUF file carries no
``tokenizer.json``, only llama.cpp's vocabulary metadata; it is rebuilt here into a
``tokenizers.Tokenizer`` the way transformers' GGUF conversion does (same ids), with the
pre-tokenizer split that llama.cpp uses for the file's ``tokenizer.ggml.pre``.

Two vocabulary spellings matter for turning one token into bytes (``token_bytes``):
- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): each token is spelled in GPT-2's printable
  byte alphabet, so a token is an arbitrary byte string, possibly part of a character;
- SentencePiece-style BPE (Llama 2, Mistral): "▁" stands for a space, and characters outside
  the vocabulary are spelled as byte tokens ``<0xNN>`` (byte fallback).
"""

from __future__ import annotations

import enum
import json
import mmap
import os
import re
import secrets
import struct
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from tokenizers import Tokenizer as _Backend

from core.chat_template import ChatTemplate
from core.errors import InvalidRequest

# Every encode on its caller's thread: with parallelism on, tokenizers runs each batch on one
# process-wide rayon pool, so a large prompt tokenized on a thread held every small prompt's
# encode on the router's event loop until it ended (2.3 s measured; docs/operations-notes.md
# "tokenizers' shared thread pool"). The router runs requests side by side already.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Spelling(enum.Enum):
    BYTE_LEVEL = "byte_level"
    SENTENCEPIECE = "sentencepiece"
    OTHER = "other"  # e.g. WordPiece: a token's bytes come from decoding it alone


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


_BYTE_ENCODER = bytes_to_unicode()
_BYTE_DECODER = {char: byte for byte, char in _BYTE_ENCODER.items()}
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Special tokens that end a turn or the text; generating any of them ends the sequence even when
# the file names another EOS (llama.cpp's end-of-generation list, the common subset).
_END_OF_GENERATION = frozenset({
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
    "<end_of_turn>", "<|end▁of▁sentence|>", "<|return|>", "</s>",
})

# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp llama-vocab.cpp).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "trillion"}
# GPT-2's split after every digit is isolated (SmolLM's own tokenizer.json: Digits + ByteLevel).
_DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx",
                     "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
# Llama 3's tokenizer looks a whole pre-token up in the vocabulary before merging (HF
# `ignore_merges`, llama.cpp likewise for these pre-tokenizers).
_IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"}


def _byte_level_pre_tokenizer(pre: str | None) -> tuple[Any, bool]:
    if pre is None or pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]), False
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]), pre in _IGNORE_MERGES_PRE
    raise ValueError(f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}")


# -- GGUF metadata ---------------------------------------------------------------------------

_V = gguf.GGUFValueType
_SCALAR_FORMATS = {
    _V.UINT8: "<B", _V.INT8: "<b", _V.UINT16: "<H", _V.INT16: "<h", _V.UINT32: "<I",
    _V.INT32: "<i", _V.FLOAT32: "<f", _V.BOOL: "<?", _V.UINT64: "<Q", _V.INT64: "<q",
    _V.FLOAT64: "<d",
}


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (not its tensors).

    gguf.GGUFReader builds numpy views for every tensor and every string (~2.7 s on SmolLM's
    49k-token vocabulary); reading the key/value section directly takes ~50 ms.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        unpack_len = struct.Struct("<Q").unpack_from

        def read_string(offset: int) -> tuple[str, int]:
            (length,) = unpack_len(buf, offset)
            end = offset + 8 + length
            return buf[offset + 8:end].decode("utf-8"), end

        def read_value(kind: int, offset: int) -> tuple[Any, int]:
            if kind == gguf.GGUFValueType.STRING:
                return read_string(offset)
            if kind == gguf.GGUFValueType.ARRAY:
                item_kind, count = struct.unpack_from("<IQ", buf, offset)
                offset += 12
                if item_kind in _SCALAR_FORMATS:
                    dtype = np.dtype(_SCALAR_FORMATS[item_kind])
                    values = np.frombuffer(buf, dtype, count, offset).tolist()
                    return values, offset + count * dtype.itemsize
                items = []
                if item_kind == gguf.GGUFValueType.STRING:  # the vocabulary: keep this loop tight
                    for _ in range(count):
                        (length,) = unpack_len(buf, offset)
                        offset += 8 + length
                        items.append(buf[offset - length:offset].decode("utf-8"))
                    return items, offset
                for _ in range(count):
                    item, offset = read_value(item_kind, offset)
                    items.append(item)
                return items, offset
            fmt = _SCALAR_FORMATS[gguf.GGUFValueType(kind)]
            return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)

        metadata: dict[str, Any] = {}
        offset = 24
        for _ in range(n_kv):
            key, offset = read_string(offset)
            (kind,) = struct.unpack_from("<I", buf, offset)
            metadata[key], offset = read_value(kind, offset + 4)
        return metadata


def _derive_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-ordered merging: every split of a token
    into two vocabulary pieces, best score first (transformers' `generate_merges`, same order)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda merge: (vocab[merge[0]], vocab[merge[1]]))
        merges.extend(local)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _from_gguf(path: Path) -> Tokenizer:
    meta = read_gguf_metadata(path)
    model_type = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = (meta.get("tokenizer.ggml.token_type")
                        or [gguf.TokenType.NORMAL] * len(tokens))
    ids = {name: meta.get(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    special_ids = {i for i, kind in enumerate(types) if kind == gguf.TokenType.CONTROL}
    if model_type == "gpt2":
        spelling = Spelling.BYTE_LEVEL
        alphabet = set(_BYTE_DECODER)
        # A token written in plain text (not the byte alphabet) is respelled; a control token so
        # written is a converter mislabel and is not added (transformers does the same).
        vocab = {token if set(token) <= alphabet else
                 "".join(_BYTE_ENCODER[b] for b in token.encode("utf-8")): i
                 for i, token in enumerate(tokens)}
        special_ids = {i for i in special_ids if set(tokens[i]) <= alphabet}
        pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False,
                                      ignore_merges=ignore_merges))
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif model_type == "llama":
        spelling = Spelling.SENTENCEPIECE
        vocab = {token: i for i, token in enumerate(tokens)}
        merges = ([tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
                  if "tokenizer.ggml.merges" in meta
                  else _derive_merges(tokens, meta["tokenizer.ggml.scores"]))
        unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
        backend = _Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                      byte_fallback=True))
        # SentencePiece's dummy prefix: a space before the text and after every special token,
        # as llama.cpp and the original Llama 2 / Mistral tokenizer.json do it (transformers'
        # GGUF conversion uses Metaspace "first" instead, which drops a leading space: " a" and
        # "a" encode alike there).
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if prefix else []) + [normalizers.Replace(" ", "▁")])
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        # Older SentencePiece files carry no flag; llama.cpp then adds BOS.
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        special_ids |= {i for name, i in ids.items()
                        if name in ("bos", "eos", "unknown", "padding") and i is not None}
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer tokenizer.ggml.model={model_type!r} in {path}")

    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i in sorted(special_ids)])
    # User-defined tokens (like <think>) are matched whole in text but are ordinary text.
    backend.add_tokens([AddedToken(token, special=False, normalized=False)
                        for token, kind in zip(tokens, types)
                        if kind == gguf.TokenType.USER_DEFINED and token in vocab])
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    _set_post_processor(backend, tokens, ids["bos"] if add_bos else None,
                        ids["eos"] if add_eos else None)
    templates = ({"default": meta["tokenizer.chat_template"]}
                 if "tokenizer.chat_template" in meta else {})
    for name in meta.get("tokenizer.chat_templates", []):
        templates[name] = meta[f"tokenizer.chat_template.{name}"]
    extra_eos = [i for i in (ids["eot"], ids["eom"]) if i is not None]
    return Tokenizer(backend, spelling=spelling, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                     extra_eos_ids=extra_eos, unk_token_id=ids["unknown"],
                     pad_token_id=ids["padding"], chat_templates=templates,
                     add_bos_token=add_bos, add_eos_token=add_eos)


def _set_post_processor(backend: _Backend, tokens: Sequence[str], bos: int | None,
                        eos: int | None) -> None:
    """``encode(add_special_tokens=True)`` adds BOS / EOS where the file says to."""
    if bos is None and eos is None:
        return

    def template(sequence: str, type_id: int) -> str:
        head = [f"{tokens[bos]}:{type_id}"] if bos is not None else []
        tail = [f"{tokens[eos]}:{type_id}"] if eos is not None else []
        return " ".join([*head, f"${sequence}:{type_id}", *tail])
    backend.post_processor = processors.TemplateProcessing(
        single=template("A", 0), pair=f"{template('A', 0)} {template('B', 1)}",
        special_tokens=[(tokens[i], i) for i in dict.fromkeys((bos, eos)) if i is not None])


# -- Hugging Face directory ------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """tokenizer_config writes a special token as a string or as an AddedToken object."""
    return value.get("content") if isinstance(value, dict) else value


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


def _decoder_steps(node: dict | None) -> list[str]:
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [kind for child in node.get("decoders", []) for kind in _decoder_steps(child)]
    return [node.get("type", "")]


def _from_hf_dir(path: Path) -> Tokenizer:
    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ValueError(f"{path} has no tokenizer.json")
    raw = tokenizer_json.read_text(encoding="utf-8")
    backend = _Backend.from_str(raw)
    spec = json.loads(raw)
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    generation = _read_json(path / "generation_config.json") or _read_json(path / "config.json")

    steps = _decoder_steps(spec.get("decoder"))
    pre = spec.get("pre_tokenizer") or {}
    if "ByteLevel" in steps or "ByteLevel" in json.dumps(pre):
        spelling = Spelling.BYTE_LEVEL
    elif ({"Metaspace", "ByteFallback"} & set(steps)
          or (spec.get("model") or {}).get("byte_fallback")):
        spelling = Spelling.SENTENCEPIECE
    else:
        spelling = Spelling.OTHER

    def special_id(name: str) -> int | None:
        content = _token_content(config.get(name)) or _token_content(special_map.get(name))
        if content:
            return backend.token_to_id(content)
        fallback = _ids_of(generation.get(f"{name}_id"))  # e.g. eos_token_id: 2 or [2, 0]
        return fallback[0] if fallback else None

    templates: dict[str, str] = {}
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": ...}]
        templates = {entry["name"]: entry["template"] for entry in template}
    elif isinstance(template, str):
        templates["default"] = template
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    elif "default" not in templates and (path / "chat_template.json").is_file():
        templates["default"] = _read_json(path / "chat_template.json")["chat_template"]

    return Tokenizer(backend, spelling=spelling, bos_token_id=special_id("bos_token"),
                     eos_token_id=special_id("eos_token"),
                     extra_eos_ids=_ids_of(generation.get("eos_token_id")),
                     unk_token_id=special_id("unk_token"), pad_token_id=special_id("pad_token"),
                     chat_templates=templates,
                     add_bos_token=bool(config.get("add_bos_token", False)),
                     add_eos_token=bool(config.get("add_eos_token", False)))


def _map_strings(value: Any, fn: Any) -> Any:
    """A copy of a JSON-like value with ``fn`` applied to every string in it (keys too)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {_map_strings(k, fn) if isinstance(k, str) else k: _map_strings(v, fn)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(item, fn) for item in value]
    return value


def _any_string(value: Any, test: Any) -> bool:
    """Whether ``test`` holds for some string in a JSON-like value (keys too), without copying
    it: the strings ``_map_strings`` would visit."""
    if isinstance(value, str):
        return bool(test(value))
    if isinstance(value, Mapping):
        return any((isinstance(k, str) and test(k)) or _any_string(v, test)
                   for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_any_string(item, test) for item in value)
    return False


# encode_chat's placeholder for special-token text in a client string: a private-use character,
# the call's nonce (16 hex digits), ":", the text's index, another private-use character. One
# pattern for every call; a match with another nonce is the client's own text and stays.
_PLACEHOLDER = re.compile("\ue000([0-9a-f]{16}):(\\d+)\ue001")


class PieceCache:
    """Token ids of recently encoded text pieces, least recently used dropped first; safe to
    share between threads.

    Bounded by entry count, by the characters of the pieces and by the ids kept for them (a
    character may take up to four byte tokens): at the defaults at most 1 Mi characters and
    256 Ki ids, ~15 MB. A piece longer than ``max_piece_chars`` is not kept.

    With ``doorkeeper`` a piece is kept the second time it is encoded: the first time only its
    hash is noted (the last ``4 * max_entries`` hashes). Most pieces are a user's new turn and
    never come again; kept at once they would push the repeated ones (system prompts, tool
    lists, the template's text) out of the LRU.
    """

    def __init__(self, max_entries: int = 4096, max_chars: int = 1 << 20,
                 max_ids: int = 1 << 18, max_piece_chars: int = 16384, doorkeeper: bool = True):
        if not 0 <= max_piece_chars <= max_chars:
            raise ValueError("max_piece_chars must be between 0 and max_chars")
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.max_ids = max_ids
        self.max_piece_chars = max_piece_chars
        self._entries: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._chars = 0
        self._ids = 0
        self._seen: dict[int, None] | None = {} if doorkeeper else None  # hashes, oldest first
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def chars(self) -> int:
        """Characters of all pieces kept."""
        return self._chars

    @property
    def ids(self) -> int:
        """Ids kept, all pieces together."""
        return self._ids

    def get_many(self, pieces: Sequence[str]) -> list[tuple[int, ...] | None]:
        """The ids kept for each piece (None where there are none), each hit made most recent."""
        found: list[tuple[int, ...] | None] = []
        with self._lock:
            entries = self._entries
            for piece in pieces:
                ids = entries.get(piece)
                if ids is not None:
                    entries.move_to_end(piece)
                found.append(ids)
            missing = found.count(None)
            self.misses += missing
            self.hits += len(found) - missing
        return found

    def put_many(self, items: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        with self._lock:
            entries = self._entries
            seen = self._seen
            for piece, ids in items:
                if len(piece) > self.max_piece_chars or len(ids) > self.max_ids:
                    continue
                if piece in entries:
                    entries.move_to_end(piece)
                    continue
                if seen is not None:
                    key = hash(piece)
                    if key in seen:  # the second sight: keep it
                        del seen[key]
                    else:  # the first: note it, keep nothing
                        seen[key] = None
                        if len(seen) > 4 * self.max_entries:
                            del seen[next(iter(seen))]
                        continue
                entries[piece] = ids
                self._chars += len(piece)
                self._ids += len(ids)
            while (len(entries) > self.max_entries or self._chars > self.max_chars
                   or self._ids > self.max_ids):
                piece, ids = entries.popitem(last=False)
                self._chars -= len(piece)
                self._ids -= len(ids)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._chars = self._ids = 0
            if self._seen is not None:
                self._seen.clear()


# -- the tokenizer ---------------------------------------------------------------------------

class Tokenizer:
    """Encode, decode, token bytes and chat templates of one model. Immutable after loading, but
    for its caches (token bytes, ``piece_cache``)."""

    def __init__(self, backend: _Backend, *, spelling: Spelling, bos_token_id: int | None,
                 eos_token_id: int | None, extra_eos_ids: Sequence[int], unk_token_id: int | None,
                 pad_token_id: int | None, chat_templates: Mapping[str, str], add_bos_token: bool,
                 add_eos_token: bool):
        self._backend = backend
        self.spelling = spelling
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.unk_token_id = unk_token_id
        self.pad_token_id = pad_token_id
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        added = backend.get_added_tokens_decoder()
        self._added_text = {i: token.content for i, token in added.items()}
        # tokenizer.json's flags, the ones decode(skip_special_tokens=True) itself follows.
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, token in added.items() if token.special)
        end_of_generation = sorted(i for i in self.special_token_ids
                                   if self._added_text.get(i) in _END_OF_GENERATION)
        eos = [i for i in (eos_token_id, *extra_eos_ids, *end_of_generation) if i is not None]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))  # EOS first, no repeats
        # Every token's bytes, built whole on the first ``token_bytes`` call (~0.1 s for 49k
        # tokens): filled one id at a time, as tokens were first seen, it grew a worker for its
        # whole life (~6 MB of dict, ints and bytes by the time the vocabulary is covered).
        self._bytes: tuple[bytes, ...] | None = None
        self._special_strings = {name: backend.id_to_token(i) for name, i in (
            ("bos_token", bos_token_id), ("eos_token", eos_token_id),
            ("unk_token", unk_token_id), ("pad_token", pad_token_id)) if i is not None}
        self._templates = {name: ChatTemplate(source, self._special_strings)
                           for name, source in chat_templates.items()}
        # encode_chat: special-token text in the client's strings is text (see there). Its
        # pieces are encoded by a copy of the backend that never reads special tokens.
        special = {token.content: (i, token.lstrip, token.rstrip)
                   for i, token in added.items() if token.special and token.content}
        self._special_by_text = special
        self._special_texts = sorted(special, key=len, reverse=True)  # longest match first
        self._special_re = (re.compile("|".join(map(re.escape, self._special_texts)))
                            if special else None)
        self._text_backend = _Backend.from_str(backend.to_str())
        self._text_backend.encode_special_tokens = True
        # Ids per piece of text between special tokens: a system prompt, a tool list and the
        # template's own text repeat from request to request.
        self.piece_cache = PieceCache()

    @classmethod
    def from_model_path(cls, path: Path) -> Tokenizer:
        """From a ``.gguf`` file or a Hugging Face directory (tokenizer.json and its configs)."""
        path = Path(path)
        if path.is_file() and path.suffix == ".gguf":
            return _from_gguf(path)
        if path.is_dir():
            return _from_hf_dir(path)
        raise ValueError(f"no GGUF file or Hugging Face tokenizer directory at {path}")

    # -- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token text in it (``<|im_end|>``) becomes that token;
        ``add_special_tokens`` adds what the model's files say to add (e.g. BOS)."""
        # The batch "fast" path skips computing offsets, which nothing here reads: half the time.
        return self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes one token stands for; may be part of a UTF-8 character. An id past the
        vocabulary (a padding row of the model's embedding) stands for no bytes."""
        table = self._bytes
        if table is None:
            # Racing threads would each build the same table: harmless.
            table = self._bytes = tuple(self._compute_bytes(i) for i in range(self.vocab_size))
        if 0 <= token_id < len(table):
            return table[token_id]
        return self._compute_bytes(token_id)

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self._added_text:
            return self._added_text[token_id].encode("utf-8")
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if self.spelling is Spelling.BYTE_LEVEL:
            if all(char in _BYTE_DECODER for char in piece):
                return bytes(_BYTE_DECODER[char] for char in piece)
            return piece.encode("utf-8")  # a token spelled outside the byte alphabet is text
        if self.spelling is Spelling.SENTENCEPIECE:
            match = _BYTE_TOKEN.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
        return self._backend.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """The token's text; a token holding part of a character shows U+FFFD for it (its exact
        bytes are ``token_bytes``)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- chat

    @property
    def chat_template(self) -> str | None:
        template = self._templates.get("default")
        return template.source if template is not None else None

    @property
    def supports_tools(self) -> bool:
        """True when the model's own template renders ``tools``."""
        return any(template.supports_tools for template in self._templates.values())

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            tools: Sequence[Mapping[str, Any]] | None = None,
                            add_generation_prompt: bool = True) -> str:
        # Like transformers: a separate "tool_use" template, when present, renders tool requests.
        name = "tool_use" if tools and "tool_use" in self._templates else "default"
        if name not in self._templates:
            raise InvalidRequest("this model has no chat template", param="messages")
        return self._templates[name].render(messages, tools, add_generation_prompt)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """The prompt's token ids: the template's own markers (``<|im_start|>``, BOS, …) become
        special tokens; what the client wrote is text, whatever it holds.

        transformers and vLLM render the template and encode the result with special tokens
        parsed, so ``"<|im_end|><|im_start|>system"`` inside a message forges a turn. Here every
        special-token text in the client's strings (messages and tools) is swapped for a
        placeholder no client can know (a random nonce between private-use characters)
        before rendering; the rendered text is cut at the special tokens it still holds (the
        template's), and each piece between them gets the client's text back and is encoded
        with special tokens read as plain text. The backend cuts at special tokens the same
        way, so a prompt without forged markers encodes exactly as ``encode`` would.

        When no client string holds special-token text (the common case) nothing is swapped.
        The ids of each piece are kept in ``piece_cache`` (a bounded LRU keyed by the piece's
        text), so a repeated system prompt, tool list or template text is encoded once."""
        if self._special_re is None:
            return self.encode(self.apply_chat_template(messages, tools), add_special_tokens=False)
        search = self._special_re.search
        if not (_any_string(messages, search)
                or (tools is not None and _any_string(tools, search))):
            # The common case: nothing to defuse, so nothing to copy and nothing to restore.
            return self._encode_rendered(self.apply_chat_template(messages, tools), None)
        nonce = secrets.token_hex(8)
        defused = self._placeholders(nonce)
        rendered = self.apply_chat_template(
            _map_strings(messages, defused),
            _map_strings(tools, defused) if tools is not None else None)
        return self._encode_rendered(rendered, nonce)

    def _placeholders(self, nonce: str) -> Any:
        """A function replacing every special-token text in a string by its placeholder."""
        index = {text: str(i) for i, text in enumerate(self._special_texts)}
        pattern = self._special_re
        assert pattern is not None

        def defuse(text: str) -> str:
            return pattern.sub(lambda m: f"\ue000{nonce}:{index[m.group(0)]}\ue001", text)
        return defuse

    def _cut_at_special_tokens(self, rendered: str) -> tuple[list[str], list[int]]:
        """The text pieces around the special tokens of ``rendered`` and those tokens' ids (one
        piece more than ids, empty where two tokens touch), cut as the backend cuts."""
        pieces: list[str] = []
        markers: list[int] = []
        start = 0
        assert self._special_re is not None
        for match in self._special_re.finditer(rendered):
            token_id, lstrip, rstrip = self._special_by_text[match.group(0)]
            if match.start() < start:  # inside the whitespace an rstrip token took
                continue
            piece = rendered[start:match.start()]
            pieces.append(piece.rstrip() if lstrip else piece)
            markers.append(token_id)
            start = match.end()
            if rstrip:
                start += len(rendered[start:]) - len(rendered[start:].lstrip())
        pieces.append(rendered[start:])
        return pieces, markers

    def _encode_rendered(self, rendered: str, nonce: str | None) -> list[int]:
        """Ids of the rendered prompt: its special-token text becomes those tokens, the pieces
        between are encoded as text after the placeholders of ``nonce`` (if any) get the
        client's text back."""
        pieces, markers = self._cut_at_special_tokens(rendered)
        if nonce is not None:
            texts = self._special_texts

            def restore(m: re.Match) -> str:
                return texts[int(m.group(2))] if m.group(1) == nonce else m.group(0)
            pieces = [_PLACEHOLDER.sub(restore, piece) if "\ue000" in piece else piece
                      for piece in pieces]
        nonempty = [piece for piece in pieces if piece]
        found = dict(zip(nonempty, self.piece_cache.get_many(nonempty)))
        missing = [piece for piece, ids in found.items() if ids is None]
        if missing:  # each piece is encoded alone, as it would be in a batch of all of them
            encoded = [(piece, tuple(encoding.ids)) for piece, encoding in zip(
                missing, self._text_backend.encode_batch_fast(missing, add_special_tokens=False))]
            found.update(encoded)
            self.piece_cache.put_many(encoded)
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:
                ids.extend(found[piece])  # type: ignore[arg-type]
            if i < len(markers):
                ids.append(markers[i])
        return ids

    # -- saving

    def save_hf(self, directory: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json, so that ``from_model_path(directory)``
        (and transformers' AutoTokenizer) load this same tokenizer."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        added = self._backend.get_added_tokens_decoder()
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "clean_up_tokenization_spaces": False,
            **self._special_strings,
            "added_tokens_decoder": {
                str(i): {"content": token.content, "lstrip": token.lstrip,
                         "normalized": token.normalized, "rstrip": token.rstrip,
                         "single_word": token.single_word,
                         "special": i in self.special_token_ids}
                for i, token in sorted(added.items())},
        }
        if len(self._templates) == 1 and "default" in self._templates:
            config["chat_template"] = self._templates["default"].source
        elif self._templates:
            config["chat_template"] = [{"name": name, "template": template.source}
                                       for name, template in self._templates.items()]
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        # EOS ids beyond the EOS token (a GGUF's EOT id) live in generation_config.json; one the
        # model's own files already wrote there is theirs to keep.
        generation = directory / "generation_config.json"
        if not generation.exists():
            generation.write_text(json.dumps(
                {"bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids)},
                indent=2) + "\n", encoding="utf-8")
