"""``braid serve``: the HTTP API (SGLang's /generate, OpenAI's /v1/*) on an in-process Engine."""

from braid.server.app import create_app
from braid.server.launch import serve

__all__ = ["create_app", "serve"]
