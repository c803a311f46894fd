"""Request bodies of the HTTP API as msgspec Structs, and their decoding.

Decoding rejects unknown fields and wrong types with InvalidRequestError naming the field
(``$.messages[0].role`` style paths become ``messages[0].role``). OpenAI fields braid accepts
but has no use for (``user``, ``metadata``, ``store``, ``service_tier``, ``parallel_tool_calls``,
``reasoning_effort``) are declared and never read; fields it cannot honour are refused by the
route with a message naming them (``tools``, ``logit_bias``, ...). SGLang's own extra fields
(sglang_fields.py) are declared the same way, typed loosely: the route drops or refuses them.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from braid.errors import InvalidRequestError
from braid.server.sglang_fields import (
    GENERATE_IGNORED,
    GENERATE_REFUSED,
    OPENAI_IGNORED,
    OPENAI_REFUSED,
)


def _declared(name: str, base: type, *tables) -> type:
    """``base`` plus every name of ``tables`` as an optional field of any type (msgspec allows one
    base with fields, so the declared fields extend a chain instead of mixing in)."""
    names = sorted({n for table in tables for n in table})
    return msgspec.defstruct(name, [(n, Any, None) for n in names], bases=(base,), forbid_unknown_fields=True)


_SglangGenerateFields = _declared("SglangGenerateFields", msgspec.Struct, GENERATE_IGNORED, GENERATE_REFUSED)


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class JsonSchemaFormat(msgspec.Struct, forbid_unknown_fields=True):
    name: str = "output"
    schema: dict | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    json_schema: JsonSchemaFormat | None = None


class Extras(msgspec.Struct, forbid_unknown_fields=True):
    """braid's own fields on the OpenAI routes (``extra_body`` in the openai client)."""

    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | dict | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    any_whitespace: bool | None = None


_SglangOpenAIFields = _declared("SglangOpenAIFields", Extras, OPENAI_IGNORED, OPENAI_REFUSED)


class _Common(_SglangOpenAIFields, forbid_unknown_fields=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict | None = None
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(_Common, forbid_unknown_fields=True):
    prompt: str | list = ""  # a string, strings, token ids, or lists of token ids (checked by the route)
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[dict] | None = None
    name: str | None = None
    # what a client echoes back from an earlier response: accepted when empty
    refusal: str | None = None
    tool_calls: list[dict] | None = None
    tool_call_id: str | None = None
    function_call: dict | None = None
    audio: dict | None = None
    reasoning_content: str | None = None  # SGLang: a reasoning model's echoed thoughts (dropped)
    tools: list[dict] | None = None  # SGLang: tools declared in a system message (refused when set)


class ChatCompletionRequest(_Common, forbid_unknown_fields=True):
    messages: list[ChatMessage] = []
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    functions: list[dict] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | float | None = None
    input_ids: list[int] | None = None  # SGLang: the prompt's token ids, instead of rendering messages


class GenerateRequest(_SglangGenerateFields, forbid_unknown_fields=True):
    """SGLang's ``/generate`` body (null means the default, as in SGLang)."""

    text: str | list[str] | None = None
    input_ids: list | None = None  # token ids or lists of them (checked by the engine)
    sampling_params: dict | list[dict] | None = None
    stream: bool | None = False
    return_logprob: bool | list[bool] | None = False  # a list: one value for every prompt
    top_logprobs_num: int | list[int] | None = 0  # a list: one value for every prompt
    logprob_start_len: int | list[int] | None = -1
    rid: str | list[str] | None = None


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    text: str | list[str]


class RenderChatRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    add_generation_prompt: bool = True


# route -> request body type, for the OpenAPI description (FastAPI cannot derive msgspec bodies)
BODIES = {"/generate": GenerateRequest, "/v1/completions": CompletionRequest,
          "/v1/chat/completions": ChatCompletionRequest, "/tokenize": TokenizeRequest,
          "/render_chat": RenderChatRequest}


def add_request_bodies(openapi: dict) -> dict:
    """``openapi`` with the JSON schemas of the request bodies (msgspec's own) under components."""
    refs, components = msgspec.json.schema_components(list(BODIES.values()),
                                                      ref_template="#/components/schemas/{name}")
    for path, ref in zip(BODIES, refs):
        openapi["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": ref}}}
    openapi.setdefault("components", {}).setdefault("schemas", {}).update(components)
    return openapi


_PATH = re.compile(r" - at `\$\.?(.*)`$")


def decode(body: bytes, cls: type) -> Any:
    """The body as ``cls``; a malformed body raises InvalidRequestError naming the field."""
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH.search(text)
        field = (m.group(1) or "body") if m else "body"
        problem = _PATH.sub("", text)
        named = re.match(r"Object (contains unknown|missing required) field `(.+)`", problem)
        if named:
            field = f"{field}.{named.group(2)}" if field != "body" else named.group(2)
            problem = "unknown field" if named.group(1) == "contains unknown" else "required"
        raise InvalidRequestError(field, problem) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError("body", f"not valid JSON: {exc}") from None
