"""The HTTP side shared by the remote backends (bd.RuntimeEndpoint, bd.OpenAI): one connection
pool per thread, JSON calls, server-sent events, and server errors turned back into the
exceptions the in-process Engine raises."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx

from braid.errors import BraidError, EngineClosedError, InvalidRequestError, RequestFailedError

TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class HttpClient:
    def __init__(self, url: str, api_key: str | None, name: str) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()

    @property
    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.url, headers=self._headers, timeout=TIMEOUT)
        return client

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """The JSON answer of one request; a non-200 answer raises its braid error."""
        try:
            r = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineClosedError(f"{self.name}: {exc!r}") from None
        if r.status_code != 200:
            raise self.error_of(r)
        return r.json()

    def events(self, path: str, body: Any) -> Iterator[dict]:
        """The JSON events of a server-sent-events answer, until ``[DONE]``; an error (the status
        or an event carrying one) raises."""
        try:
            with self._client.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise self.error_of(r)
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            raise RequestFailedError(f"{self.name}: {event['error'].get('message')}")
                        yield event
        except httpx.HTTPError as exc:
            raise EngineClosedError(f"{self.name}: {exc!r}") from None

    def error_of(self, r: httpx.Response) -> BraidError:
        """The server's error as the exception the Engine backend would have raised."""
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            return RequestFailedError(f"{self.name}: HTTP {r.status_code}: {r.text[:200]}")
        if r.status_code == 400:
            field, _, problem = err["message"].partition(": ")
            return InvalidRequestError(err.get("param") or field, problem or err["message"])
        if r.status_code in (401, 403, 404):
            return InvalidRequestError("endpoint", f"{self.name}: {err['message']}")
        if r.status_code == 503:
            return EngineClosedError(f"{self.name}: {err['message']}")
        return RequestFailedError(f"{self.name}: {err['message']}")
