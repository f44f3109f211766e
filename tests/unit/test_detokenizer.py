"""Streaming detokenization and stop strings (workers/engine/detokenizer.py), on SmolLM2's
byte-level vocabulary, where one character is often split over several tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.model_files import resolve_model_path
from core.tokenizer import Tokenizer
from workers.engine.detokenizer import IncrementalDetokenizer

PROMPT = "<|im_start|>user\nSay something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_model_path(resolve_model_path("smollm2-135m-instruct"))


def stream(tok: Tokenizer, ids: list[int], stop: tuple[str, ...] = (), prompt: str = PROMPT,
           skip_special_tokens: bool = True) -> tuple[list[str], str | None, str]:
    """Feeds ``ids`` one by one as an engine does: (deltas, matched stop, finish() text)."""
    detok = IncrementalDetokenizer(tok, tok.encode(prompt), stop, skip_special_tokens)
    deltas: list[str] = []
    for token in ids:
        text, matched = detok.add(token)
        deltas.append(text)
        if matched is not None:
            return deltas, matched, detok.finish()
    return deltas, None, detok.finish()


def splits_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    """Whether some token of ``ids`` ends inside a UTF-8 character (what makes the test hard)."""
    data = b""
    for token in ids:
        data += tok.token_bytes(token)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


@pytest.mark.parametrize("text", [
    "नमस्ते दुनिया, आज का दिन अच्छा है।",
    "தமிழ் ஒரு செம்மொழி ஆகும்.",
    "Party time 🎉🚀 family 👩‍👩‍👧‍👦 flag 🇮🇳 thumbs 👍🏽!",
    "混合 text: नमस्ते, வணக்கம், 你好 🙂 done.",
])
def test_streaming_multibyte_text_never_emits_a_broken_character(tok, text):
    ids = tok.encode(text)
    assert splits_a_character(tok, ids)
    deltas, matched, tail = stream(tok, ids)
    assert matched is None
    assert all("\ufffd" not in delta for delta in [*deltas, tail])
    assert "".join(deltas) + tail == tok.decode(ids) == text


def test_text_is_emitted_as_soon_as_each_character_is_complete(tok):
    ids = tok.encode("plain words stream at once")
    deltas, _, tail = stream(tok, ids)
    assert deltas == [tok.token_text(i) for i in ids] and tail == ""


def test_a_stop_string_split_across_tokens_is_matched_and_excluded(tok):
    text = "The answer is 42.\nEND of story, more text here."
    ids = tok.encode(text)
    stop = "\nEND"
    assert not any(stop in tok.token_text(i) for i in ids)  # it spans several tokens
    deltas, matched, tail = stream(tok, ids, stop=(stop,))
    assert matched == stop
    assert "".join(deltas) + tail == "The answer is 42."
    assert len(deltas) < len(ids)  # nothing after the stop was consumed


def test_a_stop_string_inside_one_token_cuts_that_token(tok):
    ids = tok.encode("Hello world, goodbye")
    deltas, matched, _ = stream(tok, ids, stop=("orl",))
    assert matched == "orl" and "".join(deltas) == "Hello w"


def test_a_partial_stop_that_diverges_releases_the_held_text(tok):
    text = "We STOmp and STOP! after"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), ("STOP!",))
    emitted, held_at_some_point = "", False
    for i, token in enumerate(ids):
        delta, matched = detok.add(token)
        emitted += delta
        if matched:
            break
        decoded = tok.decode(ids[:i + 1])
        assert decoded.startswith(emitted)
        assert len(decoded) - len(emitted) <= len("STOP!") - 1
        held_at_some_point |= len(decoded) > len(emitted)
    assert held_at_some_point  # "STO" was held back, then released as "STOmp"
    assert matched == "STOP!" and emitted == "We STOmp and "


def test_the_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("alpha beta gamma delta")
    deltas, matched, _ = stream(tok, ids, stop=("delta", "beta", "gamma"))
    assert matched == "beta" and "".join(deltas) == "alpha "


def test_finish_releases_text_held_for_a_stop_that_never_came(tok):
    ids = tok.encode("it ends with ST")
    deltas, matched, tail = stream(tok, ids, stop=("STOP",))
    assert matched is None
    assert "".join(deltas) == "it ends with " and tail == "ST"


def test_a_stop_string_in_the_prompt_is_not_matched(tok):
    ids = tok.encode("nothing to stop here")
    deltas, matched, tail = stream(tok, ids, stop=("Say something",))
    assert matched is None and "".join(deltas) + tail == "nothing to stop here"


def test_special_tokens_produce_no_text_unless_asked(tok):
    ids = tok.encode("Hi there<|im_end|>")
    deltas, _, tail = stream(tok, ids)
    assert "".join(deltas) + tail == "Hi there"
    deltas, _, tail = stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) + tail == "Hi there<|im_end|>"


def test_a_stop_string_can_match_across_a_multibyte_character(tok):
    text = "पहले भाग। दूसरा भाग"
    ids = tok.encode(text)
    deltas, matched, _ = stream(tok, ids, stop=("। दू",))
    assert matched == "। दू" and "".join(deltas) == "पहले भाग"


def test_a_prompt_ending_inside_a_character_is_completed_by_the_output(tok):
    text = "party 🎉 time"
    ids = tok.encode(text)
    cut = next(i for i in range(1, len(ids))
               if splits_a_character(tok, ids[:i]) and not splits_a_character(tok, ids[:i - 1]))
    prompt_ids, generated = ids[:cut], ids[cut:]
    detok = IncrementalDetokenizer(tok, prompt_ids, ())
    out = "".join(detok.add(t)[0] for t in generated) + detok.finish()
    prompt_bytes = b"".join(tok.token_bytes(i) for i in prompt_ids)
    complete = prompt_bytes.decode("utf-8", errors="ignore")
    assert "\ufffd" not in out and complete + out == text


def test_a_prompt_ending_inside_a_character_that_the_output_abandons_adds_no_garbage(tok):
    emoji = tok.encode("🎉")
    prompt_ids = tok.encode("look ") + emoji[:-1]  # the prompt stops inside the emoji
    detok = IncrementalDetokenizer(tok, prompt_ids, ())
    out = "".join(detok.add(t)[0] for t in tok.encode("fine")) + detok.finish()
    assert out == "fine"


def test_after_a_stop_no_more_text_comes_out(tok):
    detok = IncrementalDetokenizer(tok, [], ("x",))
    assert detok.add(tok.encode("x")[0]) == ("", "x")
    assert detok.add(tok.encode("more")[0]) == ("", None)
    assert detok.finish() == ""


_ALPHABET = st.sampled_from(list("ab xyz.\nअआ்த🎉中"))


def first_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Reference: text read one character at a time, cut before the first stop to complete."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if s and text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end - len(stop)], stop
    return text, None


@settings(max_examples=200, deadline=None)
@given(text=st.text(_ALPHABET, max_size=40),
       stops=st.lists(st.text(_ALPHABET, min_size=1, max_size=5), max_size=4))
def test_streamed_text_is_the_text_up_to_the_first_stop_whatever_the_token_split(
        tok, text, stops):
    ids = tok.encode(text)
    stop = tuple(stops)
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT), stop)
    emitted, matched = "", None
    hold = max((len(s) for s in stop), default=1) - 1
    for i, token in enumerate(ids):
        delta, matched = detok.add(token)
        emitted += delta
        if matched is not None:
            break
        decoded = tok.decode(ids[:i + 1]).rstrip("\ufffd")  # complete characters so far
        assert decoded.startswith(emitted) and len(decoded) - len(emitted) <= hold
    else:
        emitted += detok.finish()
    assert (emitted, matched) == first_stop(text, stop)


@pytest.mark.parametrize("text", ["வணக்கம்", "ok 🎉", "👩‍👩‍👧‍👦 family"])
def test_a_reply_cut_inside_a_character_ends_before_it_without_a_replacement_char(tok, text):
    # max_tokens cuts the reply after a token that ends inside a character: the unfinished
    # bytes are held back and dropped, never shown as U+FFFD (issue 13, finding 11).
    ids = tok.encode(text)
    cuts = [i for i in range(1, len(ids)) if splits_a_character(tok, ids[:i])
            and _ends_inside_a_character(tok, ids[:i])]
    assert cuts
    for cut in cuts:
        deltas, matched, tail = stream(tok, ids[:cut])
        out = "".join(deltas) + tail
        assert matched is None and "\ufffd" not in out
        complete = b"".join(tok.token_bytes(i) for i in ids[:cut]).decode("utf-8", "ignore")
        assert out == complete and text.startswith(out)


def _ends_inside_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    try:
        b"".join(tok.token_bytes(i) for i in ids).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
