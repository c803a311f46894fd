"""The HTTP app: SGLang's native ``/generate``, OpenAI's ``/v1/*`` (openai_routes.py), ``/health``,
``/metrics``, the routes bd.RuntimeEndpoint uses, and what the SGLang router asks of a worker
(worker_routes.py).

``create_app(engine, config)`` serves an Engine that is already loaded. Every error is an
OpenAI-style JSON body (``{"error": {"message", "type", "param", "code"}}``) with the status of
the braid error (400 for a bad field, named in ``param``); an unexpected error in one request is
a 500 for that request only. A client that disconnects aborts its request, which frees its KV.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response

from braid.config import ServerConfig
from braid.server import openai_api as oai
from braid.server.http import (
    ApiKeyMiddleware,
    add_error_handlers,
    error_response,
    json_response,
    sse,
    until_done_or_gone,
)
from braid.server.metrics import Metrics
from braid.server.openai_routes import add_openai_routes
from braid.server.protocol import GenerateRequest, RenderChatRequest, TokenizeRequest, add_request_bodies, decode
from braid.server.sglang_fields import GENERATE_REFUSED, engine_sampling, one_for_batch, refuse_set
from braid.server.worker_routes import add_worker_routes


def create_app(engine, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="braid", version="0.1.0")
    model_name = config.served_model_name or engine.model_name
    metrics = Metrics(engine)

    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key)

    add_error_handlers(app)

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
        refuse_set(req, GENERATE_REFUSED)  # SGLang's fields braid cannot honour; the others are dropped
        args = dict(prompt=req.text, input_ids=req.input_ids, sampling_params=engine_sampling(req.sampling_params),
                    return_logprob=bool(one_for_batch("return_logprob", req.return_logprob)),
                    top_logprobs_num=one_for_batch("top_logprobs_num", req.top_logprobs_num) or 0,
                    logprob_start_len=-1 if req.logprob_start_len is None else req.logprob_start_len)
        timer = metrics.timer()
        if req.stream:
            return sse(_cumulative(await engine.async_generate(**args, stream=True), timer))
        out = await until_done_or_gone(request, engine.async_generate(**args))
        timer.done()
        return json_response(out)

    add_openai_routes(app, engine, metrics, model_name)
    add_worker_routes(app, engine, config, model_name)

    def openapi() -> dict:  # FastAPI's description plus the msgspec request bodies
        if app.openapi_schema is None:
            app.openapi_schema = add_request_bodies(get_openapi(title=app.title, version=app.version,
                                                                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi
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
