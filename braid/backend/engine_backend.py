"""The in-process backend: the language on a ``bd.Engine`` in the same Python process.

Program-aware (the default): the gens of a fork group, and every choice of a select, go to the
engine as one batch, which reaches the scheduler as one message and shares one cached prefix; a
fork first caches its prefix. ``program_aware=False`` runs the same work one call at a time, the
way an interpreter without program knowledge would (the baseline of benchmarks/lang_workloads.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from braid.errors import ProgramError
from braid.lang.backend import GenCall, GenResult
from braid.lang.chat_template import PLAIN, RoleMarkers, markers_from_template
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
        if not tok.has_chat_template:
            return PLAIN
        try:
            return markers_from_template(lambda messages, gen_prompt: tok.apply_chat_template(messages, gen_prompt))
        except ValueError as exc:
            raise ProgramError(f"roles: cannot read role markers from the model's chat template ({exc}); write the "
                               "conversation's markers as text instead") from None

    # ---- gen ------------------------------------------------------------------------------------
    def generate(self, calls: list[GenCall]) -> list[GenResult]:
        same_flags = len({(c.return_logprob, c.top_logprobs_num) for c in calls}) == 1
        if not (self.program_aware and same_flags):
            return [self._generate_batch([c])[0] for c in calls]
        return self._generate_batch(calls)

    def _generate_batch(self, calls: list[GenCall]) -> list[GenResult]:
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
    def score_choices(self, prompts: list[str], choices: tuple[str, ...], unconditional: bool
                      ) -> list[list[ChoiceLogprobs]]:
        tok = self.engine.tokenizer
        # what the choices are conditioned on when nothing comes before them: BOS, else EOS
        # (GPT-style models start documents after it), else token 0
        start_token = tok.bos_token_id if tok.bos_token_id is not None else min(tok.eos_token_ids, default=0)
        seqs: list[list[int]] = []  # every (prompt, choice) sequence, then the unconditional ones
        starts: list[int] = []  # position of each sequence's first choice token
        for prompt in prompts:
            ids, start = _choice_sequences(tok, prompt, choices, start_token)
            seqs += ids
            starts += [start] * len(ids)
        if unconditional:
            for choice in choices:
                seqs.append([start_token, *tok.encode(choice)])
                starts.append(1)
        logprobs = self._prompt_logprobs(seqs, starts)
        k = len(choices)
        uncond = logprobs[len(prompts) * k :] if unconditional else [None] * k
        return [[ChoiceLogprobs(logprobs[i * k + j], uncond[j]) for j in range(k)] for i in range(len(prompts))]

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


def _choice_sequences(tok, prompt: str, choices: tuple[str, ...], start_token: int) -> tuple[list[list[int]], int]:
    """Token ids of ``prompt + choice`` for every choice, and where the choices' tokens begin:
    the text is tokenized whole (as generation would see it), and the choices start after the
    longest token prefix they all share with the prompt alone."""
    prompt_ids = tok.encode(prompt) if prompt else []
    seqs = [tok.encode(prompt + c) for c in choices]
    start = min(min(_common_prefix(prompt_ids, s), len(s) - 1) for s in seqs)
    if start == 0:  # nothing before the choices to condition on: a start token
        return [[start_token, *s] for s in seqs], 1
    return seqs, start


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
