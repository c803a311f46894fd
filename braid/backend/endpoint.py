"""``bd.RuntimeEndpoint(url, api_key=None)``: the language on a ``braid serve`` over HTTP.

It talks to the native API: ``/generate`` (a fork group's gens, and a select's scoring
requests, go in one body, so the server admits them together over one prefix, as in-process),
``/tokenize`` (select's token boundaries are found exactly as the Engine backend finds them),
``/render_chat`` (role markers from the server's own chat template) and ``/model_info``. With
greedy decoding a program gives the same text on this backend as on the Engine it serves.

Thread-safe: each thread has its own HTTP connection pool (backend/http.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from braid.backend.http import HttpClient
from braid.backend.scoring import choice_logprobs, choice_requests, start_token_of
from braid.lang.backend import GenCall, GenResult, by_logprob_flags
from braid.lang.chat_template import RoleMarkers, read_role_markers
from braid.lang.choices import ChoiceLogprobs


class RuntimeEndpoint:
    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.http = HttpClient(url, api_key, f"endpoint {url.rstrip('/')}")
        self.url = self.http.url
        self.name = self.http.name
        self._info: dict | None = None
        self._markers: RoleMarkers | None = None
        self._lock = threading.Lock()

    def model_info(self) -> dict:
        with self._lock:
            if self._info is None:
                self._info = self.http.call("GET", "/model_info")
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
        outs = self.http.call("POST", "/generate", {
            "text": [c.prompt for c in calls], "sampling_params": [c.sampling for c in calls],
            "return_logprob": calls[0].return_logprob, "top_logprobs_num": calls[0].top_logprobs_num})
        return [GenResult(o["text"], o["meta_info"]) for o in outs]

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
        outs = self.http.call("POST", "/generate", {"input_ids": seqs, "sampling_params": {"max_new_tokens": 0},
                                                    "return_logprob": True, "logprob_start_len": starts})
        logprobs = [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"]] for o in outs]
        return choice_logprobs(logprobs, len(prompts), len(choices), unconditional)

    def cache_prefix(self, prompt: str) -> None:
        self.http.call("POST", "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 0}})
