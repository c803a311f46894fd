"""The OpenAI-compatible routes: ``/v1/completions`` and ``/v1/chat/completions``."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import Response

from braid.errors import InvalidRequestError
from braid.server import openai_api as oai
from braid.server.http import HTTPError, json_response, sse, until_done_or_gone
from braid.server.metrics import Metrics
from braid.server.protocol import ChatCompletionRequest, CompletionRequest, decode


def add_openai_routes(app: FastAPI, engine, metrics: Metrics, model_name: str) -> None:
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                            "invalid_request_error", "model")

    async def run_whole(request: Request, inputs: dict, params: dict, n: int, logprob_args: dict) -> list[dict]:
        """Every choice of a non-streamed request in one engine call: validated together, admitted
        together, and cancelled together if the client leaves."""
        timer = metrics.timer()
        outs = await until_done_or_gone(request, engine.async_generate(
            **inputs, sampling_params={**params, "n": n}, **logprob_args))
        timer.done()
        return outs if isinstance(outs, list) else [outs]

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
            outs = await run_whole(request, inputs, params, req.n, logprob_args)
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
            inputs = ({"input_ids": [req.input_ids]} if req.input_ids is not None  # SGLang: rendered already
                      else {"prompt": [await asyncio.to_thread(oai.chat_prompt, engine, req)]})
            top = req.top_logprobs or 0
            if top and not req.logprobs:
                raise InvalidRequestError("top_logprobs", "needs logprobs: true")
            logprob_args = {"return_logprob": req.logprobs, "top_logprobs_num": top}
            rid, made = oai.new_id("chatcmpl"), oai.created()
            if req.stream:
                streams = await oai.open_streams(engine, inputs, params, req.n, logprob_args)
                return sse(_chat_chunks(engine, metrics, req, streams, rid, made, model_name))
            outs = await run_whole(request, inputs, params, req.n, logprob_args)
        choices = [{"index": i, "message": {"role": "assistant", "content": o["text"]},
                    "finish_reason": oai.finish_reason(o["meta_info"]),
                    "logprobs": oai.chat_logprobs(engine.tokenizer, o["meta_info"])} for i, o in enumerate(outs)]
        metas = [o["meta_info"] for o in outs]
        return json_response({"id": rid, "object": "chat.completion", "created": made, "model": model_name,
                              "choices": choices, "usage": oai.usage(metas, metas[:1])})


@contextlib.contextmanager
def openai_fields(chat: bool):
    """Engine errors named with the request's own (OpenAI) field names."""
    try:
        yield
    except InvalidRequestError as exc:
        raise InvalidRequestError(oai.openai_field(exc.field, chat), exc.problem) from None


async def _choice_chunks(streams: list, timer, finals: dict[int, dict]):
    """(choice index, engine chunk, done, this chunk's logprob meta) for every chunk of every
    choice; each finished choice's meta lands in ``finals``. Leaving early aborts every choice's
    unfinished request."""
    merged = oai.merge_streams(streams)
    async with contextlib.aclosing(merged):
        async for index, chunk in merged:
            timer.chunk(index, bool(chunk["text"]))
            meta = chunk["meta_info"]
            done = "finish_reason" in meta
            if done:
                finals[index] = meta
            yield index, chunk, done, _delta_logprobs(meta, chunk)
    timer.done()


def _usage_chunk(obj: str, finals: dict[int, dict], per_prompt: int, rid, made, model_name) -> dict:
    metas = [finals[i] for i in sorted(finals)]
    return {"id": rid, "object": obj, "created": made, "model": model_name, "choices": [],
            "usage": oai.usage(metas, metas[::per_prompt])}


async def _completion_chunks(engine, metrics, req, streams, rid, made, model_name):
    finals: dict[int, dict] = {}
    offsets: dict[int, int] = {}
    with_usage = bool(req.stream_options and req.stream_options.include_usage)
    async for index, chunk, done, lp_meta in _choice_chunks(streams, metrics.timer(), finals):
        offset = offsets.get(index, 0)
        logprobs = oai.completion_logprobs(engine.tokenizer, lp_meta, offset)
        offsets[index] = offset + len(chunk["text"])
        if chunk["text"] or done:
            out = {"id": rid, "object": "text_completion", "created": made, "model": model_name,
                   "choices": [{"index": index, "text": chunk["text"], "logprobs": logprobs,
                                "finish_reason": oai.finish_reason(chunk["meta_info"]) if done else None}]}
            if with_usage:  # as OpenAI: null on every chunk but the last
                out["usage"] = None
            yield out
    if with_usage:
        yield _usage_chunk("text_completion", finals, req.n, rid, made, model_name)


async def _chat_chunks(engine, metrics, req, streams, rid, made, model_name):
    finals: dict[int, dict] = {}
    with_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk_of(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
        chunk = {"id": rid, "object": "chat.completion.chunk", "created": made, "model": model_name,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if with_usage:  # as OpenAI: null on every chunk but the last
            chunk["usage"] = None
        return chunk

    for i in range(req.n):  # OpenAI opens every choice with its role
        yield chunk_of(i, {"role": "assistant", "content": ""}, None)
    async for index, chunk, done, lp_meta in _choice_chunks(streams, metrics.timer(), finals):
        logprobs = oai.chat_logprobs(engine.tokenizer, lp_meta)
        if chunk["text"] or logprobs:
            yield chunk_of(index, {"content": chunk["text"]}, None, logprobs)
        if done:
            yield chunk_of(index, {}, oai.finish_reason(chunk["meta_info"]))
    if with_usage:  # one prompt: its tokens counted once
        yield _usage_chunk("chat.completion.chunk", finals, req.n, rid, made, model_name)


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
