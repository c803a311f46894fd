"""``bd.OpenAI(model, base_url=None, api_key=None)``: the language on any OpenAI-compatible chat API.

A chat API takes whole messages and answers with a new assistant message, so a gen (or a select)
must open an assistant turn: ``s += bd.assistant(bd.gen("x"))`` works, text before the gen in the
same turn, or a gen outside an assistant turn, raise UnsupportedFeatureError naming the feature.
- ``json_schema`` goes as ``response_format`` (``json_schema`` type); ``regex``, ``ebnf`` and
  ``choices`` (as a regex of the alternatives) and sampling fields OpenAI lacks (``top_k``,
  ``min_p``, ...) go as extra body fields, which braid serve, SGLang and vLLM-style servers read;
  a server that does not know them answers with an error, raised here with its message.
- ``select`` asks for a reply constrained to the choices (temperature 0) where the server supports
  it; the choice it returns scores 0, the others minus infinity. The
  ``unconditional_likelihood_normalized`` method needs prompt log-probabilities: refused.
- Fork prefixes need no caching here; a fork group's calls run concurrently on threads.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from braid.backend.http import HttpClient
from braid.errors import RequestFailedError, UnsupportedFeatureError
from braid.lang.backend import GenCall, GenResult
from braid.lang.chat_template import PLAIN, RoleMarkers
from braid.lang.choices import ChoiceLogprobs

# sampling fields under OpenAI's own names; the rest go as extra body fields
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "stop": "stop",
                 "seed": "seed", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
_EXTRA_NAMES = {"min_new_tokens": "min_tokens"}
_FINISH = {"stop": {"type": "stop", "matched": None}, "length": {"type": "length"}}


class OpenAI:
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None) -> None:
        self.model = model
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.http = HttpClient(url, key, f"openai {model} at {url}")
        self.name = self.http.name

    # ---- the Backend protocol --------------------------------------------------------------------
    def role_markers(self) -> RoleMarkers:
        return PLAIN  # the text of a chat-API program is for reading; the API gets messages

    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        return self._chats(calls, "gen")

    def generate_stream(self, call: GenCall, on_text: Callable[[str], None]) -> GenResult:
        body = {**self._body(call, "gen"), "stream": True, "stream_options": {"include_usage": True}}
        text, finish, usage = "", None, {}
        for event in self.http.events("/chat/completions", body):
            usage = event.get("usage") or usage
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    text += piece
                    on_text(piece)
                finish = choice.get("finish_reason") or finish
        return GenResult(text, _meta(finish, usage))

    def score_choices(self, calls: list[GenCall], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        if unconditional:
            raise UnsupportedFeatureError("select with choices_method='unconditional_likelihood_normalized' (it "
                                          "needs prompt log-probabilities)", self.name)
        constrained = [GenCall(c.prompt, {"regex": _alternatives(choices), "temperature": 0.0,
                                          "max_new_tokens": 256}, conversation=c.conversation) for c in calls]
        out = []
        for answer in (r.text for r in self._chats(constrained, "select")):
            if answer not in choices:
                raise RequestFailedError(f"{self.name}: the reply {answer[:80]!r} is none of the choices; the server "
                                         "may not support constrained output (regex)")
            out.append([ChoiceLogprobs([0.0 if c == answer else float("-inf")]) for c in choices])
        return out

    def cache_prefix(self, prompt: str) -> None:
        pass  # a chat API caches what it caches

    # ---- requests --------------------------------------------------------------------------------
    def _body(self, call: GenCall, what: str) -> dict[str, Any]:
        conv = call.conversation
        if conv is None or conv.open_role != "assistant" or conv.open_content:
            raise UnsupportedFeatureError(f"a {what} that does not open an assistant turn (chat APIs only answer "
                                          "with a whole new assistant message)", self.name)
        body: dict[str, Any] = {"model": self.model, "messages": list(conv.messages), "n": 1}
        for key, value in call.sampling.items():
            if key == "json_schema":
                schema = json.loads(value) if isinstance(value, str) else value
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
            elif key == "choices":
                body["regex"] = _alternatives(value)
            else:
                body[_OPENAI_NAMES.get(key) or _EXTRA_NAMES.get(key, key)] = value
        if call.return_logprob:
            body["logprobs"] = True
            if call.top_logprobs_num:
                body["top_logprobs"] = call.top_logprobs_num
        return body

    def _chats(self, calls: list[GenCall], what: str) -> list[GenResult]:
        """One chat completion per call, concurrently (a chat API takes one conversation each)."""
        if len(calls) == 1:
            return [self._chat(calls[0], what)]
        with ThreadPoolExecutor(max_workers=min(len(calls), 16)) as pool:
            return list(pool.map(lambda c: self._chat(c, what), calls))

    def _chat(self, call: GenCall, what: str) -> GenResult:
        out = self.http.call("POST", "/chat/completions", self._body(call, what))
        choice = out["choices"][0]
        return GenResult(choice["message"].get("content") or "", _meta(choice.get("finish_reason"), out.get("usage")))


def _alternatives(choices) -> str:
    return "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))


def _meta(finish: str | None, usage: dict | None) -> dict[str, Any]:
    usage = usage or {}
    return {"prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "finish_reason": _FINISH.get(finish, {"type": finish})}
