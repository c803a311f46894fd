"""``bd.RuntimeEndpoint(url, api_key=None)``: the language on a ``braid serve`` over HTTP.

It talks to the native API: ``/generate`` (a fork group's gens, and a select's scoring
requests, go in one body, so the server admits them together over one prefix, as in-process),
``/tokenize`` (select's token boundaries are found exactly as the Engine backend finds them),
``/render_chat`` (role markers from the server's own chat template) and ``/model_info``. With
greedy decoding a program gives the same text on this backend as on the Engine it serves.

Thread-safe: each thread has its own HTTP client (connection pool).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import httpx

from braid.backend.scoring import choice_logprobs, choice_requests, start_token_of
from braid.errors import BraidError, EngineClosedError, InvalidRequestError, ProgramError, RequestFailedError
from braid.lang.backend import GenCall, GenResult
from braid.lang.chat_template import PLAIN, RoleMarkers, markers_from_template
from braid.lang.choices import ChoiceLogprobs

TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class RuntimeEndpoint:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.name = f"endpoint {self.url}"
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._local = threading.local()
        self._info: dict | None = None
        self._markers: RoleMarkers | None = None
        self._lock = threading.Lock()

    # ---- HTTP ------------------------------------------------------------------------------------
    @property
    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(base_url=self.url, headers=self._headers, timeout=TIMEOUT)
        return client

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise EngineClosedError(f"{self.name}: {exc!r}") from None
        if r.status_code != 200:
            raise _error_of(r, self.name)
        return r.json()

    def model_info(self) -> dict:
        with self._lock:
            if self._info is None:
                self._info = self._call("GET", "/model_info")
            return self._info

    # ---- the Backend protocol --------------------------------------------------------------------
    def role_markers(self) -> RoleMarkers:
        with self._lock:
            if self._markers is None:
                self._markers = self._read_markers()
            return self._markers

    def _read_markers(self) -> RoleMarkers:
        if not self._call("GET", "/model_info")["has_chat_template"]:
            return PLAIN

        def render(messages: list[dict], gen_prompt: bool) -> str:
            return self._call("POST", "/render_chat", {"messages": messages, "add_generation_prompt": gen_prompt})[
                "text"]

        try:
            return markers_from_template(render)
        except ValueError as exc:
            raise ProgramError(f"roles: cannot read role markers from the server's chat template ({exc})") from None

    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        groups: dict[tuple[bool, int], list[int]] = {}
        for i, c in enumerate(calls):  # one body per logprob setting (the API takes one per body)
            groups.setdefault((c.return_logprob, c.top_logprobs_num), []).append(i)
        results: list[GenResult | None] = [None] * len(calls)
        for (logprob, top), idx in groups.items():
            outs = self._call("POST", "/generate", {
                "text": [calls[i].prompt for i in idx], "sampling_params": [calls[i].sampling for i in idx],
                "return_logprob": logprob, "top_logprobs_num": top})
            for i, out in zip(idx, outs):
                results[i] = GenResult(out["text"], out["meta_info"])
        return results  # type: ignore[return-value]

    def generate_stream(self, call: GenCall, on_text: Callable[[str], None]) -> GenResult:
        body = {"text": call.prompt, "sampling_params": call.sampling, "stream": True,
                "return_logprob": call.return_logprob, "top_logprobs_num": call.top_logprobs_num}
        text, meta = "", {}
        try:
            with self._client.stream("POST", "/generate", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    raise _error_of(r, self.name)
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RequestFailedError(f"{self.name}: {event['error']['message']}")
                    on_text(event["text"][len(text):])  # events hold the text so far
                    text, meta = event["text"], event["meta_info"]
        except httpx.HTTPError as exc:
            raise EngineClosedError(f"{self.name}: {exc!r}") from None
        return GenResult(text, meta)

    def score_choices(self, calls: list[GenCall], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        prompts = [c.prompt for c in calls]
        info = self.model_info()
        seqs, starts = choice_requests(lambda texts: self._call("POST", "/tokenize", {"text": texts})["tokens"],
                                       prompts, choices, unconditional,
                                       start_token_of(info["bos_token_id"], info["eos_token_ids"]))
        outs = self._call("POST", "/generate", {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0},
                                                "return_logprob": True, "logprob_start_len": starts})
        logprobs = [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"]] for o in outs]
        return choice_logprobs(logprobs, len(prompts), len(choices), unconditional)

    def cache_prefix(self, prompt: str) -> None:
        self._call("POST", "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 0}})


def _error_of(r: httpx.Response, name: str) -> BraidError:
    """The server's error as the exception the Engine backend would have raised."""
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return RequestFailedError(f"{name}: HTTP {r.status_code}: {r.text[:200]}")
    if r.status_code == 400:
        field, _, problem = err["message"].partition(": ")
        return InvalidRequestError(err.get("param") or field, problem or err["message"])
    if r.status_code in (401, 403, 404):
        return InvalidRequestError("endpoint", f"{name}: {err['message']}")
    if r.status_code == 503:
        return EngineClosedError(f"{name}: {err['message']}")
    return RequestFailedError(f"{name}: {err['message']}")
