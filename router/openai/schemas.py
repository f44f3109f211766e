"""The chat-completions request at the HTTP edge (pydantic v2), validated once.

Ranges and rules are docs/api.md's ("Request fields"); where it is silent, OpenAI's. Unknown fields are accepted and
ignored. Optional fields default to None ("not given"): defaults are applied once, in
``router/chat/service.py``'s converter to the wire request, so "explicitly 16" and "unset" stay
distinguishable (``max_tokens`` is clamped when unset and checked when given).

Fields whose JSON type may vary (message ``content``, ``stop``, ``logit_bias``,
``tool_choice``) are normalised by ``mode="before"`` validators into one Python type: pydantic
would otherwise report union-member labels in error locations, and an error's location
becomes the OpenAI error's ``param``. Cross-field rules sit on the later field and read the
earlier ones from ``info.data`` so that their errors name the offending field.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from core.chat_template import tool_arguments
from core.errors import InvalidRequest
from core.json_schema_subset import UnsupportedSchema, check_schema
from router.openai.errors import from_validation_errors, invalid_json

# n > 1 makes the worker run n sequences sharing one prompt; 16 bounds one request's share of a
# worker's batch (the engine's SamplingParams enforces the same bound).
MAX_N = 16
MAX_STOP = 4
MAX_STOP_CHARS = 256  # the detokenizer holds back up to a stop string's length - 1 characters
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS = 300  # OpenAI's limit
MAX_TOOLS = 64
MAX_TOP_LOGPROBS = 20
DEFAULT_MAX_MESSAGES = 200
# Tool and function names, as OpenAI restricts them.
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Token ids and top_k travel as uint32: anything larger is refused here, never overflows there.
MAX_TOKEN_ID = INT32_MAX

Role = Literal["system", "developer", "user", "assistant", "tool"]
# Roles whose messages must carry content (assistant may carry tool_calls instead).
_CONTENT_REQUIRED = frozenset({"system", "developer", "user", "tool"})


def _bad(kind: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(kind, message)


def _check_schema(schema: dict[str, Any], *, require_object: bool = False) -> None:
    try:
        check_schema(schema, require_object=require_object)
    except UnsupportedSchema as exc:
        raise _bad("json_schema", str(exc)) from None


class _EdgeModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class FunctionCall(_EdgeModel):
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _arguments_nesting(cls, value: str) -> str:
        try:
            tool_arguments(value)  # rendering parses them: deep JSON is refused up front
        except InvalidRequest as exc:
            raise _bad("arguments", exc.message) from None
        return value


class ToolCall(_EdgeModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_EdgeModel):
    """One message. ``content`` arrives as a string or an array of text parts and is kept as
    one string (parts joined with newlines, as vLLM does) or None."""

    role: Role
    # Before content: whether content may be null depends on them.
    tool_calls: list[ToolCall] | None = None
    content: str | None = Field(None, validate_default=True)
    name: str | None = None
    tool_call_id: str | None = Field(None, validate_default=True)

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise _bad("content_type", "content must be a string or an array of text parts")
        if not value:
            raise _bad("content_type", "content must not be an empty array")
        texts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad("content_part", f"content part {i} has type {kind!r}; only 'text' "
                           "parts are supported")
            if not isinstance(part.get("text"), str):
                raise _bad("content_part", f"content part {i} needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls_on_assistant(cls, value: list[ToolCall] | None,
                                 info: ValidationInfo) -> list[ToolCall] | None:
        if value and info.data.get("role") != "assistant":
            raise _bad("tool_calls", "only assistant messages may carry 'tool_calls'")
        return value or None

    @field_validator("content")
    @classmethod
    def _content_required(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None or "role" not in info.data:
            return value
        role = info.data["role"]
        if role in _CONTENT_REQUIRED:
            raise _bad("required", f"{role} messages need 'content'")
        if role == "assistant" and "tool_calls" in info.data and not info.data["tool_calls"]:
            raise _bad("required", "assistant messages need 'content' or 'tool_calls'")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _tool_call_id_on_tool(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not value:
            raise _bad("required", "tool messages need 'tool_call_id'")
        return value

    def to_template_dict(self) -> dict[str, Any]:
        """The plain dict the chat template renders (OpenAI's message shape)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(_EdgeModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _parameters_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value:  # {} declares no parameters, as an absent schema does
            _check_schema(value, require_object=True)
        return value


class Tool(_EdgeModel):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoice(_EdgeModel):
    """``"none"``, ``"auto"``, ``"required"``, or a named function (``mode="function"``)."""

    mode: Literal["none", "auto", "required", "function"]
    name: str | None = None


class JsonSchemaFormat(_EdgeModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    # "schema" would shadow a BaseModel attribute; the alias keeps the wire name.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            _check_schema(value)
        return value


class ResponseFormat(_EdgeModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = Field(None, validate_default=True)

    @field_validator("json_schema")
    @classmethod
    def _schema_given(cls, value: JsonSchemaFormat | None,
                      info: ValidationInfo) -> JsonSchemaFormat | None:
        if info.data.get("type") == "json_schema" and value is None:
            raise _bad("required", "response_format of type 'json_schema' needs 'json_schema'")
        return value


class StreamOptions(_EdgeModel):
    include_usage: bool | None = None


class ChatCompletionRequest(_EdgeModel):
    """``POST /v1/chat/completions``. Field order matters: cross-field rules read earlier ones.

    ``max_messages`` comes from the validation context (``parse_chat_request``).
    """

    model: str
    messages: list[ChatMessage]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX)
    stop: tuple[str, ...] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    logit_bias: dict[int, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    # vLLM extras.
    top_k: int | None = Field(None, ge=-1, le=INT32_MAX)  # -1 and 0 disable it
    min_p: float | None = Field(None, ge=0, le=1)
    # Below 0.1 a logit divided by the penalty could overflow (the worker's bound too).
    repetition_penalty: float | None = Field(None, ge=0.1, le=2)
    min_tokens: int | None = Field(None, ge=0, le=INT64_MAX)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    cache_salt: str | None = None
    # vLLM's meaning: LOWER values are served first (the converter flips it for the wire).
    priority: int | None = Field(None, ge=INT32_MIN + 1, le=INT32_MAX)

    @field_validator("messages", mode="before")
    @classmethod
    def _message_count(cls, value: Any, info: ValidationInfo) -> Any:
        # Checked before the messages themselves, so an oversized list costs nothing more.
        if isinstance(value, list):
            limit = (info.context or {}).get("max_messages", DEFAULT_MAX_MESSAGES)
            if not value:
                raise _bad("too_short", "messages must hold at least one message")
            if len(value) > limit:
                raise _bad("too_long", f"at most {limit} messages are allowed, got {len(value)}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None,
                                    info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise _bad("stream_options", "stream_options is only allowed when stream is true")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "stop must be a string or an array of strings")
        if len(stops) > MAX_STOP:
            raise _bad("stop", f"stop may hold at most {MAX_STOP} strings")
        if any(not s for s in stops):
            raise _bad("stop", "stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise _bad("stop", f"stop strings may be at most {MAX_STOP_CHARS} characters long")
        return tuple(stops)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _bad("logit_bias", "logit_bias must map token ids to numbers")
        if len(value) > MAX_LOGIT_BIAS:
            raise _bad("logit_bias", f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, "
                       f"got {len(value)}")
        out: dict[int, float] = {}
        for key, bias in value.items():
            # ASCII digits only: str.isdigit() also accepts '²', which int() refuses.
            if not isinstance(key, str) or not (key.isascii() and key.isdigit()) \
                    or int(key) > MAX_TOKEN_ID:
                raise _bad("logit_bias", f"logit_bias key {str(key)[:20]!r} is not a token id")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) \
                    or not -100 <= bias <= 100:
                raise _bad("logit_bias", f"logit_bias of token {key} must be a number "
                           "between -100 and 100")
            out[int(key)] = float(bias)
        return out

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise _bad("top_logprobs", "top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _tool_names_unique(cls, value: list[Tool] | None) -> list[Tool] | None:
        seen: set[str] = set()
        for tool in value or ():
            if tool.function.name in seen:
                raise _bad("tools", f"the tool name {tool.function.name!r} is repeated; tool "
                           "names must be unique")
            seen.add(tool.function.name)
        return value

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice_shape(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            if value not in ("none", "auto", "required"):
                raise _bad("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                           "{\"type\": \"function\", \"function\": {\"name\": ...}}")
            return {"mode": value}
        function = value.get("function") if isinstance(value, dict) else None
        if not (isinstance(value, dict) and value.get("type") == "function"
                and isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise _bad("tool_choice", "a named tool_choice must be "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        return {"mode": "function", "name": function["name"]}

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_names_a_tool(cls, value: ToolChoice | None,
                                  info: ValidationInfo) -> ToolChoice | None:
        if value is None or "tools" not in info.data:
            return value
        tools: list[Tool] | None = info.data["tools"]
        if value.mode == "required" and not tools:
            raise _bad("tool_choice", "tool_choice 'required' needs tools")
        if value.mode == "function":
            names = {t.function.name for t in tools or ()}
            if value.name not in names:
                raise _bad("tool_choice", f"tool_choice names {value.name!r}, which is not "
                           "in tools")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_tokens_within_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = info.data.get("max_completion_tokens") or info.data.get("max_tokens")
        if value and limit and value > limit:
            raise _bad("min_tokens", "min_tokens must not exceed max_tokens")
        return value

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and any(not 0 <= t <= MAX_TOKEN_ID for t in value):
            raise _bad("stop_token_ids", "stop_token_ids must be token ids >= 0")
        return value

    @property
    def completion_limit(self) -> tuple[int | None, str]:
        """The explicit completion-token limit and the field that set it
        (``max_completion_tokens`` wins over the older ``max_tokens``)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def decode_json(raw: bytes) -> Any:
    """The request body as JSON; malformed JSON is a 400, never a 422."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_json(str(exc)) from None


def admission_fields(data: Any) -> tuple[str, int]:
    """What admission needs, read before anything else is validated: the model id (a string)
    and the sequences the request asks for (``n``; 1 when it is not a valid n: the full
    validation, after the limits, names it). The rest waits until the tenant is admitted, so
    a tenant over its limits costs the router no more than this."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    model = data.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model")
    if not isinstance(model, str):
        raise InvalidRequest("Invalid value for 'model': Input should be a valid string.",
                             param="model")
    n = data.get("n")
    valid_n = isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_N
    return model, n if valid_n else 1


def parse_chat_request(data: Any, *, max_messages: int) -> ChatCompletionRequest:
    """Validate a decoded JSON body; any violation is an InvalidRequest naming the field."""
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(data, context={"max_messages": max_messages})
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from None
