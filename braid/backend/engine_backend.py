"""The in-process backend: the language on a ``bd.Engine`` in the same Python process.

Program-aware (the default): the gens of a fork group, and every choice of a select, go to the
engine as one batch, which reaches the scheduler as one message and shares one cached prefix; a
fork first caches its prefix. ``program_aware=False`` runs the same work one call at a time, the
way an interpreter without program knowledge would (the baseline of benchmarks/lang_workloads.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from braid.backend.scoring import choice_logprobs, choice_requests, start_token_of
from braid.lang.backend import GenCall, GenResult, by_logprob_flags
from braid.lang.chat_template import RoleMarkers, read_role_markers
from braid.lang.choices import ChoiceLogprobs


class EngineBackend:
    def __init__(self, engine, program_aware: bool = True) -> None:
        self.engine = engine
        self.program_aware = program_aware
        self.name = "engine" if program_aware else "engine (naive)"
        self._markers: RoleMarkers | None = None
        self._lock = threading.Lock()

    # ---- roles ----------------------------------------------------------------------------------
    def role_markers(self) -> RoleMarkers:
        with self._lock:
            if self._markers is None:
                self._markers = self._read_markers()
            return self._markers

    def _read_markers(self) -> RoleMarkers:
        tok = self.engine.tokenizer
        return read_role_markers(tok.has_chat_template, tok.apply_chat_template, "model")

    # ---- gen ------------------------------------------------------------------------------------
    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        if not self.program_aware:  # one call at a time
            return [r for c in calls for r in self._generate_batch([c])]
        return by_logprob_flags(calls, self._generate_batch)

    def _generate_batch(self, calls: list[GenCall]) -> list[GenResult]:
        """One engine call for ``calls``, which share their logprob flags."""
        outs = self.engine.generate(prompt=[c.prompt for c in calls], sampling_params=[c.sampling for c in calls],
                                    return_logprob=calls[0].return_logprob,
                                    top_logprobs_num=calls[0].top_logprobs_num)
        return [GenResult(o["text"], o["meta_info"]) for o in outs]

    def generate_stream(self, call: GenCall, on_text: Callable[[str], None]) -> GenResult:
        pieces, meta = [], {}
        for chunk in self.engine.generate(prompt=call.prompt, sampling_params=call.sampling, stream=True,
                                          return_logprob=call.return_logprob,
                                          top_logprobs_num=call.top_logprobs_num):
            pieces.append(chunk["text"])
            on_text(chunk["text"])
            meta = chunk["meta_info"]
        return GenResult("".join(pieces), meta)

    # ---- select ---------------------------------------------------------------------------------
    def score_choices(self, calls: list[GenCall], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        prompts = [c.prompt for c in calls]
        tok = self.engine.tokenizer
        seqs, starts = choice_requests(lambda texts: [tok.encode(t) for t in texts], prompts, choices, unconditional,
                                       start_token_of(tok.bos_token_id, tok.eos_token_ids))
        return choice_logprobs(self._prompt_logprobs(seqs, starts), len(prompts), len(choices), unconditional)

    def _prompt_logprobs(self, seqs: list[list[int]], starts: list[int]) -> list[list[float]]:
        def run(ids: list[list[int]], start: list[int]) -> list[dict]:
            return self.engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0},
                                        return_logprob=True, logprob_start_len=start)

        if self.program_aware:
            outs = run(seqs, starts)
        else:  # one scoring pass per choice, as an interpreter without program knowledge does
            outs = [run([s], [st])[0] for s, st in zip(seqs, starts)]
        return [[lp for lp, _, _ in o["meta_info"]["input_token_logprobs"]] for o in outs]

    # ---- fork -----------------------------------------------------------------------------------
    def cache_prefix(self, prompt: str) -> None:
        if self.program_aware:
            self.engine.generate(prompt=prompt, sampling_params={"max_new_tokens": 0})

