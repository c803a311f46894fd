"""What a router asks of a worker, in SGLang's names: ``/server_info`` (``/get_server_info``),
``/get_load`` and ``/v1/loads``, ``/flush_cache``. There is deliberately no ``/version``: the
router takes a worker answering it for vLLM (``/server_info`` identifies an SGLang-style worker).

The SGLang router (``smg``) reads these when a worker registers and while it balances load; none
of them is needed to serve requests. Engine state comes from ``Engine.get_stats()``, read on a
worker thread (the scheduler answers between steps) with a bounded wait.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import FastAPI
from fastapi.responses import Response

import braid
from braid.config import ServerConfig
from braid.server.http import error_response, json_response
from braid.server.metrics import STATS_TIMEOUT_S


async def engine_stats(engine) -> dict:
    return await asyncio.wait_for(asyncio.to_thread(engine.get_stats), STATS_TIMEOUT_S)


def load_of(stats: dict) -> dict:
    """One engine's load in SGLang's per-rank names (braid runs one rank per server)."""
    pool = stats["pool_slots"]
    used = pool - stats["free_slots"] - stats["evictable_slots"]  # held by requests, not by the cache only
    return {"dp_rank": 0, "num_running_reqs": stats["running"], "num_waiting_reqs": stats["waiting"],
            "num_reqs": stats["running"] + stats["waiting"], "num_total_reqs": stats["running"] + stats["waiting"],
            "num_used_tokens": used, "num_tokens": used, "num_cached_tokens": stats["evictable_slots"],
            "max_total_num_tokens": pool, "token_usage": used / max(pool, 1)}


def server_info(engine, config: ServerConfig, model_name: str) -> dict:
    """The server and engine settings, flat as SGLang's; never the API key."""
    engine_cfg = dataclasses.asdict(engine.config)
    return {
        **engine_cfg,
        "model_path": engine.config.model_path or engine.model_folder,
        "tokenizer_path": engine.model_folder,
        "served_model_name": model_name,
        "host": config.host, "port": config.port, "api_key_required": config.api_key is not None,
        "context_length": engine.context_len, "dp_size": 1, "is_embedding": False,
        "version": braid.__version__, "engine": "braid",
    }  # fmt: skip


def add_worker_routes(app: FastAPI, engine, config: ServerConfig, model_name: str) -> None:
    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's older name
    async def get_server_info() -> Response:
        stats = await engine_stats(engine)
        return json_response({**server_info(engine, config, model_name),
                              "max_total_num_tokens": stats["pool_slots"],
                              "max_running_requests": engine.config.max_running_requests})

    @app.get("/get_load")
    async def get_load() -> Response:
        return json_response([load_of(await engine_stats(engine))])

    @app.get("/v1/loads")
    async def loads() -> Response:
        return json_response({"timestamp": time.time(), "dp_rank_count": 1,
                              "loads": [load_of(await engine_stats(engine))]})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        """Empty the radix cache. The engine refuses while any request runs or waits (their KV is
        in the tree), so this answers 409 then, and 200 once the cache is empty."""
        before = await engine_stats(engine)
        busy = before["running"] + before["waiting"]
        if not busy:
            engine.flush_cache()
            after = await engine_stats(engine)  # the scheduler handles messages in order: flushed by now
            if after["evictable_slots"] == 0 and after["locked_slots"] == 0:
                return json_response({"flushed": True, "freed_tokens": before["evictable_slots"],
                                      "message": "cache flushed"})
            busy = after["running"] + after["waiting"]
        return error_response(409, f"cache not flushed: {busy} request(s) running or waiting; flush when idle",
                              "conflict")
