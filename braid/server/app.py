"""The HTTP app: SGLang's native ``/generate``, OpenAI's ``/v1/*``, ``/health``, ``/metrics``.

``create_app(engine, config)`` serves an Engine that is already loaded. Every error is an
OpenAI-style JSON body (``{"error": {"message", "type", "param", "code"}}``) with the status of
the braid error (400 for a bad field, named in ``param``); an unexpected error in one request is
a 500 for that request only. A client that disconnects aborts its request, which frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from braid.config import ServerConfig
from braid.errors import BraidError, InvalidRequestError
from braid.server import openai_api as oai
from braid.server.metrics import Metrics
from braid.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    RenderChatRequest,
    TokenizeRequest,
    decode,
)

log = logging.getLogger("braid.server")
DISCONNECT_POLL_S = 0.5


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


_CODES = {401: "invalid_api_key", 404: "model_not_found"}


def error_response(status: int, message: str, kind: str, param: str | None = None) -> Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": _CODES.get(status)}}
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def json_response(body: Any) -> Response:
    return Response(msgspec.json.encode(body), media_type="application/json")


def sse(chunks: AsyncIterator[Any]) -> StreamingResponse:
    async def frames() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks):
            try:
                async for chunk in chunks:
                    yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
            except BraidError as exc:  # the status line is sent already: report in-band, as OpenAI does
                yield b"data: " + msgspec.json.encode({"error": {"message": str(exc), "type": _kind(exc)}}) + b"\n\n"
            except Exception as exc:
                log.exception("stream failed")
                yield b"data: " + msgspec.json.encode({"error": {"message": f"internal error: {exc!r}",
                                                                 "type": "internal_error"}}) + b"\n\n"
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames(), media_type="text/event-stream")


class ApiKeyMiddleware:
    """With an API key set, every route but /health needs ``Authorization: Bearer KEY`` (401)."""

    def __init__(self, app, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self.expected):
                response = error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                          "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _kind(exc: BraidError) -> str:
    return "invalid_request_error" if exc.http_status == 400 else "server_error"


def create_app(engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="braid", version="0.1.0")
    model_name = config.served_model_name or engine.model_name
    metrics = Metrics(engine)

    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)

    @app.exception_handler(HTTPError)
    async def on_http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.message, exc.kind, exc.param)

    @app.exception_handler(BraidError)
    async def on_braid_error(request: Request, exc: BraidError) -> Response:
        param = exc.field if isinstance(exc, InvalidRequestError) else None
        return error_response(exc.http_status, str(exc), _kind(exc), param)

    @app.exception_handler(StarletteHTTPException)
    async def on_route_error(request: Request, exc: StarletteHTTPException) -> Response:  # 404, 405, ...
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_error(request: Request, exc: Exception) -> Response:  # that request's 500, not the server's end
        log.error("request failed: %r", exc, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    async def until_done_or_gone(request: Request, work: Awaitable[Any]) -> Any:
        """Await ``work``; if the client disconnects first, cancel it (the engine aborts)."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise HTTPError(499, "client disconnected", "client_closed_request")
        finally:  # also when this handler itself is cancelled (shutdown)
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                            "invalid_request_error", "model")

    # ---- service ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if not engine.is_alive:
            return error_response(503, "the engine is not running", "server_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = await metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(engine.started_at), "owned_by": "braid",
             "max_model_len": engine.context_len}]})

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's older name
    async def model_info() -> Response:
        tok = engine.tokenizer
        return json_response({"model_path": engine.config.model_path or engine.model_folder,
                              "served_model_name": model_name, "is_generation": True,
                              "context_len": engine.context_len, "vocab_size": engine.vocab_size,
                              "bos_token_id": tok.bos_token_id, "eos_token_ids": sorted(tok.eos_token_ids),
                              "has_chat_template": tok.has_chat_template})

    # ---- native ------------------------------------------------------------------------------------
    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        req = decode(await request.body(), TokenizeRequest)
        texts = [req.text] if isinstance(req.text, str) else req.text
        return json_response({"tokens": [engine.tokenizer.encode(t) for t in texts]})

    @app.post("/render_chat")
    async def render_chat(request: Request) -> Response:
        """A conversation through the model's chat template (what /v1/chat/completions sends)."""
        req = decode(await request.body(), RenderChatRequest)
        messages = [{"role": m.role, "content": oai.message_text(i, m.content)} for i, m in enumerate(req.messages)]
        return json_response({"text": engine.tokenizer.apply_chat_template(messages, req.add_generation_prompt)})

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        req = decode(await request.body(), GenerateRequest)
        args = dict(prompt=req.text, input_ids=req.input_ids, sampling_params=req.sampling_params,
                    return_logprob=req.return_logprob, top_logprobs_num=req.top_logprobs_num,
                    logprob_start_len=req.logprob_start_len)
        timer = metrics.timer()
        if req.stream:
            return sse(_cumulative(await engine.async_generate(**args, stream=True), timer))
        out = await until_done_or_gone(request, engine.async_generate(**args))
        timer.done()
        return json_response(out)

    # ---- OpenAI ------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = decode(await request.body(), CompletionRequest)
        check_model(req.model)
        with openai_fields(chat=False):
            params = oai.sampling_params(req, 16 if req.max_tokens is None else req.max_tokens)
            inputs = oai.completion_inputs(req.prompt)
            logprob_args = {"return_logprob": req.logprobs is not None, "top_logprobs_num": req.logprobs or 0}
            rid, made = oai.new_id("cmpl"), oai.created()
            if req.stream:
                streams = await oai.open_streams(engine, inputs, params, req.n, logprob_args)
                return sse(_completion_chunks(engine, metrics, req, streams, rid, made, model_name))
            timer = metrics.timer()
            # one call for every prompt: validated together, admitted together, cancelled together
            outs = await until_done_or_gone(request, engine.async_generate(
                **inputs, sampling_params={**params, "n": req.n}, **logprob_args))
        timer.done()
        choices = [{"index": i, "text": o["text"], "finish_reason": oai.finish_reason(o["meta_info"]),
                    "logprobs": oai.completion_logprobs(engine.tokenizer, o["meta_info"], 0)}
                   for i, o in enumerate(outs)]
        metas = [o["meta_info"] for o in outs]
        return json_response({"id": rid, "object": "text_completion", "created": made, "model": model_name,
                              "choices": choices, "usage": oai.usage(metas, metas[:: req.n])})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = decode(await request.body(), ChatCompletionRequest)
        check_model(req.model)
        with openai_fields(chat=True):
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = oai.sampling_params(req, max_tokens if max_tokens is not None else engine.context_len)
            oai.apply_response_format(req, params)
            inputs = {"prompt": [await asyncio.to_thread(oai.chat_prompt, engine, req)]}
            top = req.top_logprobs or 0
            if top and not req.logprobs:
                raise InvalidRequestError("top_logprobs", "needs logprobs: true")
            logprob_args = {"return_logprob": req.logprobs, "top_logprobs_num": top}
            rid, made = oai.new_id("chatcmpl"), oai.created()
            if req.stream:
                streams = await oai.open_streams(engine, inputs, params, req.n, logprob_args)
                return sse(_chat_chunks(engine, metrics, req, streams, rid, made, model_name))
            timer = metrics.timer()
            outs = await until_done_or_gone(request, engine.async_generate(
                **inputs, sampling_params={**params, "n": req.n}, **logprob_args))
        timer.done()
        choices = [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                    "finish_reason": oai.finish_reason(o["meta_info"]),
                    "logprobs": oai.chat_logprobs(engine.tokenizer, o["meta_info"])} for i, o in enumerate(outs)]
        metas = [o["meta_info"] for o in outs]
        return json_response({"id": rid, "object": "chat.completion", "created": made, "model": model_name,
                              "choices": choices, "usage": oai.usage(metas, metas[:1])})

    return app


async def _cumulative(stream: AsyncIterator[dict], timer) -> AsyncIterator[dict]:
    """/generate's stream as SGLang sends it: every event holds the text and output ids so far
    (clients print ``text[len(previous):]``); meta_info is complete on the last event."""
    text, ids = "", []
    async with contextlib.aclosing(stream):
        async for chunk in stream:
            timer.chunk(0, bool(chunk["text"]))
            text += chunk["text"]
            ids += chunk["output_ids"]
            meta = chunk["meta_info"] if "finish_reason" in chunk["meta_info"] else {
                **chunk["meta_info"], "completion_tokens": len(ids), "finish_reason": None}
            yield {"text": text, "output_ids": ids, "meta_info": meta}
    timer.done()


@contextlib.contextmanager
def openai_fields(chat: bool):
    """Engine errors named with the request's own (OpenAI) field names."""
    try:
        yield
    except InvalidRequestError as exc:
        raise InvalidRequestError(oai.openai_field(exc.field, chat), exc.problem) from None


async def _completion_chunks(engine, metrics, req, streams, rid, made, model_name):
    timer, metas, offsets = metrics.timer(), {}, {}
    merged = oai.merge_streams(streams)
    async with contextlib.aclosing(merged):  # leaving early aborts every choice's request
        async for index, chunk in merged:
            timer.chunk(index, bool(chunk["text"]))
            meta = chunk["meta_info"]
            done = "finish_reason" in meta
            if done:
                metas[index] = meta
            offset = offsets.get(index, 0)
            logprobs = oai.completion_logprobs(engine.tokenizer, _delta_logprobs(meta, chunk), offset)
            offsets[index] = offset + len(chunk["text"])
            if chunk["text"] or done:
                yield {"id": rid, "object": "text_completion", "created": made, "model": model_name,
                       "choices": [{"index": index, "text": chunk["text"], "logprobs": logprobs,
                                    "finish_reason": oai.finish_reason(meta) if done else None}]}
    timer.done()
    if req.stream_options and req.stream_options.include_usage:
        ordered = [metas[i] for i in sorted(metas)]
        yield {"id": rid, "object": "text_completion", "created": made, "model": model_name, "choices": [],
               "usage": oai.usage(ordered, ordered[:: req.n])}


async def _chat_chunks(engine, metrics, req, streams, rid, made, model_name):
    timer, metas = metrics.timer(), {}

    def chunk_of(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": made, "model": model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    for i in range(req.n):  # OpenAI opens every choice with its role
        yield chunk_of(i, {"role": "assistant", "content": ""}, None)
    merged = oai.merge_streams(streams)
    async with contextlib.aclosing(merged):  # leaving early aborts every choice's request
        async for index, chunk in merged:
            timer.chunk(index, bool(chunk["text"]))
            meta = chunk["meta_info"]
            done = "finish_reason" in meta
            if done:
                metas[index] = meta
            logprobs = oai.chat_logprobs(engine.tokenizer, _delta_logprobs(meta, chunk))
            if chunk["text"] or logprobs:
                yield chunk_of(index, {"content": chunk["text"]}, None, logprobs)
            if done:
                yield chunk_of(index, {}, oai.finish_reason(meta))
    timer.done()
    if req.stream_options and req.stream_options.include_usage:
        ordered = [metas[i] for i in sorted(metas)]
        yield {"id": rid, "object": "chat.completion.chunk", "created": made, "model": model_name, "choices": [],
               "usage": oai.usage(ordered, ordered[:1])}


def _delta_logprobs(meta: dict, chunk: dict) -> dict:
    """The logprobs of this chunk's tokens (a final chunk's meta holds every token's)."""
    if "output_token_logprobs" not in meta:
        return meta
    n = len(chunk["output_ids"])
    if "finish_reason" not in meta:
        return meta
    out = {"output_token_logprobs": meta["output_token_logprobs"][len(meta["output_token_logprobs"]) - n:]}
    if "output_top_logprobs" in meta:
        out["output_top_logprobs"] = meta["output_top_logprobs"][len(meta["output_top_logprobs"]) - n:]
    return out
