"""OpenAI-compatible ``/v1/completions`` and ``/v1/chat/completions`` on an Engine.

Requests become ``Engine.async_generate`` calls with SGLang's sampling names; results become
OpenAI's response objects (or ``chat.completion.chunk`` / ``text_completion`` server-sent
events, ``data: [DONE]`` last, a usage chunk when ``stream_options.include_usage``). Field
names and error shapes follow OpenAI's, so the official client works unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from braid.errors import InvalidRequestError, RequestFailedError
from braid.server.protocol import ChatCompletionRequest, CompletionRequest, Extras
from braid.server.sglang_fields import OPENAI_REFUSED, refuse_set

_EXTRA_NAMES = {"min_tokens": "min_new_tokens"}
MAX_N = 64  # completions per prompt in one request
MAX_TOP_LOGPROBS = 20  # OpenAI's own limit for chat; braid applies it to completions too


def sampling_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """The engine's sampling dict for one OpenAI request (n handled by the caller)."""
    _refuse_unsupported(req)
    p: dict[str, Any] = {}
    if max_tokens is not None:
        p["max_new_tokens"] = max_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop"):
        value = getattr(req, name)
        if value is not None:
            p[name] = value
    for name in Extras.__struct_fields__:
        value = getattr(req, name)
        if value is not None:
            p[_EXTRA_NAMES.get(name, name)] = value
    return p


def _refuse_unsupported(req) -> None:
    if req.logit_bias:
        raise InvalidRequestError("logit_bias", "not supported by braid")
    refuse_set(req, OPENAI_REFUSED)
    if isinstance(req, CompletionRequest):
        if req.echo:
            raise InvalidRequestError("echo", "not supported by braid")
        if req.suffix:
            raise InvalidRequestError("suffix", "not supported by braid")
        if req.best_of not in (None, req.n):
            raise InvalidRequestError("best_of", "only best_of == n (or unset) is supported")
    else:
        for name in ("tools", "functions"):
            if getattr(req, name):
                raise InvalidRequestError(name, "tool calling is not supported by braid; use json_schema or regex")
    if not 1 <= req.n <= MAX_N:
        raise InvalidRequestError("n", f"expected an integer in [1, {MAX_N}], got {req.n}")
    top = req.logprobs if isinstance(req, CompletionRequest) else req.top_logprobs
    name = "logprobs" if isinstance(req, CompletionRequest) else "top_logprobs"
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(name, f"expected an integer in [0, {MAX_TOP_LOGPROBS}], got {top}")


def apply_response_format(req: ChatCompletionRequest, params: dict[str, Any]) -> None:
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return
    if any(k in params for k in ("regex", "ebnf", "json_schema")):
        raise InvalidRequestError("response_format", "give either response_format or regex/ebnf/json_schema")
    if fmt.type == "json_object":
        params["json_schema"] = {"type": "object"}
    elif fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema is None:
            raise InvalidRequestError("response_format.json_schema.schema", "required for type json_schema")
        params["json_schema"] = fmt.json_schema.schema
    else:
        raise InvalidRequestError("response_format.type", f"expected text, json_object or json_schema, "
                                                          f"got {fmt.type!r}")


def chat_prompt(engine, req: ChatCompletionRequest) -> str:
    if not req.messages:
        raise InvalidRequestError("messages", "at least one message is required")
    messages = []
    for i, m in enumerate(req.messages):
        if m.role not in ("system", "user", "assistant", "developer"):
            raise InvalidRequestError(f"messages[{i}].role", f"expected system, user, assistant or developer, "
                                                             f"got {m.role!r}")
        if m.tool_calls or m.function_call or m.audio or m.tools:
            raise InvalidRequestError(f"messages[{i}]", "tool calls and audio are not supported by braid")
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": message_text(i, m.content)})
    # as OpenAI: the reply is a new assistant turn, even after an assistant message
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def message_text(i: int, content: str | list[dict] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"messages[{i}].content[{j}]", "only text parts are supported")
        parts.append(part["text"])
    return "".join(parts)


def finish_reason(meta: dict) -> str | None:
    """OpenAI's finish_reason; an aborted request (an engine-side failure) raises."""
    reason = meta.get("finish_reason")
    if reason is None:
        return None
    if reason["type"] == "abort":
        raise RequestFailedError(f"the request was aborted: {reason.get('message')}")
    return "length" if reason["type"] == "length" else "stop"


def completion_inputs(prompt: Any) -> dict[str, list]:
    """OpenAI's prompt forms as one engine call: ``prompt=[texts]`` or ``input_ids=[[ids]]``."""
    if isinstance(prompt, str):
        return {"prompt": [prompt]}
    if prompt and all(isinstance(p, str) for p in prompt):
        return {"prompt": list(prompt)}
    if prompt and all(_is_ids(p) for p in prompt):
        return {"input_ids": [list(p) for p in prompt]}
    if _is_ids(prompt) and prompt:
        return {"input_ids": [list(prompt)]}
    raise InvalidRequestError("prompt", "expected a string, a list of strings, a list of token ids or a list of "
                                        "token-id lists (none empty)")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def openai_field(field: str, chat: bool) -> str:
    """An engine field name as the OpenAI request spelled it."""
    names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "input_ids": "input_ids" if chat else "prompt", "top_logprobs_num": "top_logprobs" if chat else "logprobs"}
    field = field.removeprefix("sampling_params.")
    return names.get(field, field)


def usage(metas: list[dict], prompt_metas: list[dict]) -> dict[str, Any]:
    prompt = sum(m["prompt_tokens"] for m in prompt_metas)
    completion = sum(m["completion_tokens"] for m in metas)
    cached = sum(m.get("cached_tokens", 0) for m in prompt_metas)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


# ---- logprobs ------------------------------------------------------------------------------------
def chat_logprobs(tokenizer, meta: dict) -> dict | None:
    if "output_token_logprobs" not in meta:
        return None
    tops = meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"])
    content = []
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], tops):
        entry = _token_entry(tokenizer, tid, lp)
        entry["top_logprobs"] = [_token_entry(tokenizer, t, v) for v, t, _ in (top or [])]
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokenizer, meta: dict, offset: int) -> dict | None:
    if "output_token_logprobs" not in meta:
        return None
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    top_rows = meta.get("output_top_logprobs") or [None] * len(meta["output_token_logprobs"])
    for (lp, tid, _), top in zip(meta["output_token_logprobs"], top_rows):
        text = token_text(tokenizer, tid)
        tokens.append(text)
        lps.append(lp)
        offsets.append(pos)
        pos += len(text)
        alternatives: dict[str, float] = {}
        for v, t, _ in top or []:  # most likely first: two ids with one spelling keep the likelier
            alternatives.setdefault(token_text(tokenizer, t), v)
        tops.append(alternatives)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def token_text(tokenizer, tid: int) -> str:
    return tokenizer.token_bytes(tid).decode("utf-8", errors="replace")


def _token_entry(tokenizer, tid: int, lp: float) -> dict:
    raw = tokenizer.token_bytes(tid)  # exact, also for a token that is part of a character
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}


# ---- running -------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def open_streams(engine, inputs: dict[str, list], params: dict, n: int, logprob_args: dict) -> list:
    """One engine stream per choice (choice ``p * n + i`` is sample ``i`` of prompt ``p``), all
    validated before the response starts: a bad request is a 400, not an in-band error. Nothing
    is queued until a stream is first read."""
    (key, values), = inputs.items()
    streams = []
    for value in values:
        for i in range(n):
            sp = {**params, "n": 1}
            if params.get("seed") is not None:
                sp["seed"] = params["seed"] + i
            streams.append(await engine.async_generate(**{key: value}, sampling_params=sp, stream=True,
                                                       **logprob_args))
    return streams


async def merge_streams(streams: list) -> AsyncIterator[tuple[int, dict]]:
    """(choice index, engine chunk) for every chunk of every stream, as they come. Closing this
    iterator cancels the pumps, whose streams then abort their unfinished requests."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk, None))
        except Exception as exc:  # reported to the consumer, which ends the response
            await queue.put((index, None, exc))
        finally:
            await queue.put((index, None, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_count = len(tasks)
        while open_count:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                open_count -= 1
                continue
            yield index, chunk
    finally:  # cancelling a pump runs its stream's cleanup, which aborts an unfinished request
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            with contextlib.suppress(Exception):
                await s.aclose()


def created() -> int:
    return int(time.time())
