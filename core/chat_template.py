"""A model's chat template: Jinja source from the model files, rendered the way transformers does.

Templates come from model files, so they are untrusted code: they run in Jinja's immutable
sandbox with the same globals and filters transformers gives them (``raise_exception``,
``tojson`` without HTML escaping, ``strftime_now``, ``namespace``, ``dict``), so that a template
renders here exactly as it does in ``tokenizer.apply_chat_template``.

Every failure while rendering is the client's messages not fitting the template (a role it
rejects, a ``null`` content it concatenates), so it becomes ``InvalidRequest``, never a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import InvalidRequest
from core.json_schema_subset import MAX_NESTING, nesting

# Exceptions a template raises on input it cannot render: Jinja's own (undefined names, sandbox
# violations) and the Python errors of the expressions it evaluates ('a' + None, x[5], 1/0).
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError,
                  AttributeError, ArithmeticError)


def _raise_exception(message: str) -> None:
    raise InvalidRequest(f"the model's chat template rejected the messages: {message}",
                         param="messages")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's built-in tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """``dict(...)`` for templates without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names (a path towards CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore attributes on a namespace ({name!r})")


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """A deep copy made of JSON types only: the template sees no object with methods of its own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    raise InvalidRequest(f"chat messages may only hold JSON values, not {type(value).__name__}",
                         param="messages")


def _text_of_parts(parts: list) -> str:
    """Content given as ``[{"type": "text", "text": ...}, ...]`` as one string (parts joined by
    newlines, as vLLM does for templates that expect string content)."""
    texts = []
    for part in parts:
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(
                part.get("text"), str):
            raise InvalidRequest(
                'message content parts must be {"type": "text", "text": ...}', param="messages")
        texts.append(part["text"])
    return "\n".join(texts)


def tool_arguments(text: str) -> Any:
    """A tool call's ``arguments`` string (OpenAI sends JSON text) as the JSON value it holds,
    or the string itself when it is not JSON. JSON nested more than ``MAX_NESTING`` levels is
    refused (``InvalidRequest``): rendering it (the template's ``tojson``, our copies) recurses,
    and a client could make the router's stack overflow with one message."""
    try:
        value = json.loads(text)
    except RecursionError:  # the decoder's own recursion: deeper than anything we render
        value = None
        depth = MAX_NESTING + 1
    except ValueError:
        return text
    else:
        depth = nesting(value)
    if depth > MAX_NESTING:
        raise InvalidRequest(f"tool call arguments may nest JSON at most {MAX_NESTING} levels "
                             "deep", param="messages")
    return value


def _message_for_template(message: Any) -> dict:
    if not isinstance(message, Mapping):
        raise InvalidRequest("each message must be an object", param="messages")
    message = _plain(message)
    if isinstance(message.get("content"), list):
        message["content"] = _text_of_parts(message["content"])
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        # OpenAI sends arguments as a JSON string; templates (Qwen, Llama 3.1, Hermes) expect the
        # object and apply `tojson` themselves, so a string would be encoded twice.
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            # Not JSON: the template gets the string the client sent.
            arguments = tool_arguments(function["arguments"])
            if isinstance(arguments, dict):
                function["arguments"] = arguments
    return message


class ChatTemplate:
    """A compiled chat template plus the special-token strings templates read as variables."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]):
        self.source = source
        self._special_tokens = dict(special_tokens)  # bos_token, eos_token, unk_token, pad_token
        env = _environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise InvalidRequest(f"the model's chat template does not compile: {exc}") from exc
        # A template that never reads `tools` would silently drop them: callers need to know.
        self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)

    def render(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None = None,
               add_generation_prompt: bool = True) -> str:
        chat = [_message_for_template(message) for message in messages]
        variables = {
            **self._special_tokens,
            "messages": chat,
            "tools": _plain(list(tools)) if tools is not None else None,
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return self._template.render(**variables)
        except InvalidRequest:
            raise
        except _RENDER_ERRORS as exc:
            raise InvalidRequest(
                f"the model's chat template cannot render these messages: "
                f"{type(exc).__name__}: {exc}", param="messages") from exc
