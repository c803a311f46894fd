"""``bd.RuntimeEndpoint(url, api_key=None)``: the language on a ``braid serve`` over HTTP.

It talks to the native API: ``/generate``, ``/tokenize`` (select's token boundaries are found
exactly as the Engine backend finds them), ``/render_chat`` (role markers from the server's own
chat template) and ``/get_model_info``. Every ``/generate`` body holds one prompt (a string or
one token-id list, one sampling dict, one logprob start): the SGLang router refuses batch forms
(``"text": [...]``, lists of sampling dicts or starts), so a fork group's gens and a select's
scoring requests go as concurrent single requests; the server's scheduler still shares their
common prefix through the radix cache. With greedy decoding a program gives the same text on this
backend as on the Engine it serves.

Thread-safe: each thread has its own HTTP connection pool (backend/http.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from braid.backend.http import HttpClient
from braid.backend.scoring import choice_logprobs, choice_requests, start_token_of
from braid.lang.backend import GenCall, GenResult, by_logprob_flags
from braid.lang.chat_template import RoleMarkers, read_role_markers
from braid.lang.choices import ChoiceLogprobs

MAX_CONCURRENT = 32  # single requests in flight per endpoint for one batch of calls


class RuntimeEndpoint:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.http = HttpClient(url, api_key, f"endpoint {url.rstrip('/')}")
        self.url = self.http.url
        self.name = self.http.name
        self._info: dict | None = None
        self._markers: RoleMarkers | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def model_info(self) -> dict:
        with self._lock:
            if self._info is None:
                self._info = self.http.call("GET", "/get_model_info")  # the name the SGLang router forwards
            return self._info

    # ---- the Backend protocol --------------------------------------------------------------------
    def role_markers(self) -> RoleMarkers:
        has_template = self.model_info()["has_chat_template"]
        with self._lock:
            if self._markers is None:
                self._markers = read_role_markers(has_template, self._render, "server")
            return self._markers

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return self.http.call("POST", "/render_chat", body)["text"]

    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        return by_logprob_flags(calls, self._generate_body)

    def _generate_body(self, calls: list[GenCall]) -> list[GenResult]:
        outs = self._each([{"text": c.prompt, "sampling_params": c.sampling, "return_logprob": c.return_logprob,
                            "top_logprobs_num": c.top_logprobs_num} for c in calls])
        return [GenResult(o["text"], o["meta_info"]) for o in outs]

    def _each(self, bodies: list[dict]) -> list[dict]:
        """The answers to single-prompt /generate bodies, in order; sent concurrently."""
        if len(bodies) == 1:
            return [self.http.call("POST", "/generate", bodies[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(MAX_CONCURRENT, thread_name_prefix="braid-endpoint")
        return list(self._pool.map(lambda body: self.http.call("POST", "/generate", body), bodies))

    def generate_stream(self, call: GenCall, on_text: Callable[[str], None]) -> GenResult:
        body = {"text": call.prompt, "sampling_params": call.sampling, "stream": True,
                "return_logprob": call.return_logprob, "top_logprobs_num": call.top_logprobs_num}
        text, meta = "", {}
        for event in self.http.events("/generate", body):
            on_text(event["text"][len(text):])  # events hold the text so far
            text, meta = event["text"], event["meta_info"]
        return GenResult(text, meta)

    def score_choices(self, calls: list[GenCall], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        prompts = [c.prompt for c in calls]
        info = self.model_info()
        seqs, starts = choice_requests(lambda texts: self.http.call("POST", "/tokenize", {"text": texts})["tokens"],
                                       prompts, choices, unconditional,
                                       start_token_of(info["bos_token_id"], info["eos_token_ids"]))
        outs = self._each([{"input_ids": seq, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                            "logprob_start_len": start} for seq, start in zip(seqs, starts)])
        logprobs = [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"]] for o in outs]
        return choice_logprobs(logprobs, len(prompts), len(choices), unconditional)

    def cache_prefix(self, prompt: str) -> None:
        self.http.call("POST", "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 0}})
