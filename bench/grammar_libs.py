"""Grammar libraries on SmolLM2's tokenizer: import, tokenizer set-up, compile, mask fill.

    python bench/grammar_libs.py [--path /tmp/gram] [--schema rich|simple] llguidance xgrammar outlines

Only llguidance is a project dependency; install the others into a scratch folder and pass it
with ``--path`` (docs/structured-output.md). Prints one JSON line per library: seconds for
import, tokenizer set-up and compile (best of 5), and µs per token mask fill along the tokens
of a valid document (median, p90, max).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from core.model_files import resolve_model_path  # noqa: E402
from core.tokenizer import Tokenizer  # noqa: E402

SCHEMAS = {
    "rich": {"type": "object", "additionalProperties": False,
             "required": ["name", "age", "tags", "address"], "properties": {
                 "name": {"type": "string", "maxLength": 40},
                 "age": {"type": "integer", "minimum": 0, "maximum": 150},
                 "email": {"type": "string"},
                 "tags": {"type": "array", "maxItems": 5,
                          "items": {"type": "string", "enum": ["a", "b", "vip"]}},
                 "address": {"type": "object", "required": ["city"],
                             "additionalProperties": False, "properties": {
                                 "city": {"type": "string"},
                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
                 "score": {"type": "number", "minimum": 0, "maximum": 1}}},
    "simple": {"type": "object", "required": ["name", "age", "tags", "address"], "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "required": ["city"], "properties": {
            "city": {"type": "string"}, "zip": {"type": "string"}}},
        "score": {"type": "number"}}},
}
DOC = ('{"name": "Alice Smith", "age": 42, "tags": ["vip", "a"], '
       '"address": {"city": "Paris", "zip": "75001"}, "score": 0.5}')
SEPARATORS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def best_of(n, fn):
    times = []
    for _ in range(n):
        value, t = timed(fn)
        times.append(t)
    return value, min(times)


def run_llguidance(tokens, tok, eos, schema, doc_ids):
    lg, t_import = timed(lambda: __import__("llguidance"))

    class View:
        eos_token_id = eos[0]
        bos_token_id = tok.bos_token_id
        special_token_ids = sorted(tok.special_token_ids)

        def __init__(self):
            self.tokens = tokens

        def __call__(self, data: bytes):
            return tok.encode(data.decode("utf-8", "replace"))

    llt, t_setup = timed(lambda: lg.LLTokenizer(lg.TokenizerWrapper(View()), n_vocab=len(tokens),
                                                eos_token=list(eos)))
    grammar = lg.LLMatcher.grammar_from_json_schema(schema, overrides=SEPARATORS)
    matcher, t_compile = best_of(5, lambda: lg.LLMatcher(llt, grammar))
    bits = torch.zeros((len(tokens) + 31) // 32, dtype=torch.int32)
    fills = []
    for token in doc_ids:
        _, t = timed(lambda: matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4))
        fills.append(t)
        assert matcher.consume_token(token), matcher.get_error()
    return t_import, t_setup, t_compile, fills


def run_xgrammar(tokens, tok, eos, schema, doc_ids):
    xgr, t_import = timed(lambda: __import__("xgrammar"))
    info, t_setup = timed(lambda: xgr.TokenizerInfo(tokens, xgr.VocabType.RAW,
                                                    vocab_size=len(tokens),
                                                    stop_token_ids=list(eos)))
    compiled, t_compile = best_of(5, lambda: xgr.GrammarCompiler(
        info, cache_enabled=False).compile_json_schema(json.dumps(schema), any_whitespace=False))
    matcher = xgr.GrammarMatcher(compiled)
    bits = xgr.allocate_token_bitmask(1, len(tokens))
    fills = []
    for token in doc_ids:
        _, t = timed(lambda: matcher.fill_next_token_bitmask(bits))
        fills.append(t)
        assert matcher.accept_token(token)
    return t_import, t_setup, t_compile, fills


def run_outlines(tokens, tok, eos, schema, doc_ids):
    oc, t_import = timed(lambda: __import__("outlines_core"))
    from outlines_core.json_schema import build_regex_from_schema

    def vocabulary():
        by_bytes: dict[bytes, list[int]] = {}
        for i, b in enumerate(tokens):
            if i not in eos and b:
                by_bytes.setdefault(b, []).append(i)
        return oc.Vocabulary(eos[0], by_bytes)

    vocab, t_setup = timed(vocabulary)
    index, t_compile = best_of(2, lambda: oc.Index(build_regex_from_schema(json.dumps(schema)),
                                                   vocab))
    guide = oc.Guide(index)
    bits = torch.zeros((1, (len(tokens) + 31) // 32), dtype=torch.int32)
    fills = []
    for token in doc_ids:
        _, t = timed(lambda: guide.write_mask_into(bits.data_ptr(), bits.numel(), 4))
        fills.append(t)
        guide.advance(token)
    return t_import, t_setup, t_compile, fills


RUNNERS = {"llguidance": run_llguidance, "xgrammar": run_xgrammar, "outlines": run_outlines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("libraries", nargs="*", default=list(RUNNERS),
                    help="any of: " + ", ".join(RUNNERS))
    ap.add_argument("--path", help="a folder holding the libraries that are not installed")
    ap.add_argument("--schema", choices=list(SCHEMAS), default="rich")
    args = ap.parse_args()
    if args.path:
        sys.path.insert(0, args.path)
    tok = Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))
    tokens = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    doc_ids = tok.encode(DOC)
    for lib in args.libraries:
        t_import, t_setup, t_compile, fills = RUNNERS[lib](
            tokens, tok, tok.eos_token_ids, SCHEMAS[args.schema], doc_ids)
        fills_us = sorted(f * 1e6 for f in fills)
        print(json.dumps({"library": lib, "schema": args.schema,
                          "import_s": round(t_import, 4), "tokenizer_setup_s": round(t_setup, 4),
                          "compile_s": round(t_compile, 5),
                          "fill_us_median": round(statistics.median(fills_us), 1),
                          "fill_us_p90": round(fills_us[int(0.9 * len(fills_us))], 1),
                          "fill_us_max": round(fills_us[-1], 1)}), flush=True)


if __name__ == "__main__":
    main()
