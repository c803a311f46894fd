"""Start a server: load the engine, run one forward, then listen (``/health`` is 200 from then)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from braid.config import EngineConfig, ServerConfig
from braid.server.app import create_app

log = logging.getLogger("braid.server")


class _Server(uvicorn.Server):
    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # the port may have been 0: report the one bound
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            print(f"braid serve: ready at http://{host}:{port}", flush=True)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> None:
    """Load the model, warm it up, and serve until interrupted (blocks)."""
    from braid.runtime.engine import Engine

    with Engine(**vars(engine_config)) as engine:
        engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 1})  # a first forward pass
        engine.flush_cache()
        app = create_app(engine, server_config)
        config = uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="warning",
                                timeout_graceful_shutdown=5)
        _Server(config).run()
    sys.stdout.flush()
