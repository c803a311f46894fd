"""Per-token bookkeeping on the scheduler thread: sampling inputs, logprobs, finish checks,
incremental text, and the RequestOutput messages sent to the front."""

from __future__ import annotations

from collections.abc import Callable

import torch

from braid.grammar.validate import validate_json
from braid.runtime.batch import ExtendPlan
from braid.runtime.constraints import Constraints
from braid.runtime.detokenizer import decode_output
from braid.runtime.messages import RequestOutput
from braid.runtime.request import FinishReason, Req
from braid.runtime.sampler import SamplingInput, choose_tokens, logprobs_of, sample

PROMPT_TAIL = 8  # prompt tokens decoded before the output, so its first token renders as in context


class OutputProcessor:
    def __init__(self, tokenizer, constraints: Constraints, on_output: Callable[[RequestOutput], None]) -> None:
        self.tokenizer = tokenizer
        self.constraints = constraints
        self.on_output = on_output
        self.eos_ids = frozenset(tokenizer.eos_token_ids)

    # ---- sampling -------------------------------------------------------------------------------
    def sample(self, reqs: list[Req], logits: torch.Tensor, shared_generator, masks=None) -> list[int]:
        """``masks``: ``constraints.prepare_masks(reqs)``, started before the forward pass."""
        inputs = [self._sampling_input(r, shared_generator) for r in reqs]
        self.constraints.mask_logits(logits, reqs, masks)  # in place: logits are this step's own copy
        out = sample(logits, inputs)
        for i, req in enumerate(reqs):
            if req.return_logprob:
                req.output_logprobs.append((out.logprobs[i], out.token_ids[i], None))
                if req.top_logprobs_num:
                    req.output_top_logprobs.append([(lp, tid, None) for lp, tid in out.top_logprobs[i]])
        return out.token_ids

    @torch.inference_mode()  # masks in place: the logits may be a CUDA graph's (inference) output
    def choose_tokens(self, reqs: list[Req], logits: torch.Tensor, shared_generator) -> torch.Tensor:
        """``sample`` for requests that want no logprobs, the tokens left on the device."""
        assert not any(r.return_logprob for r in reqs), "logprobs need sample()"
        self.constraints.mask_logits(logits, reqs)
        return choose_tokens(logits, [self._sampling_input(r, shared_generator) for r in reqs])

    def _sampling_input(self, req: Req, shared_generator) -> SamplingInput:
        p = req.params
        banned: list[int] = []  # a constrained request's bans are in its grammar mask
        if req.matcher is None and len(req.output_ids) < p.min_new_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(self.eos_ids))
        return SamplingInput(
            params=p, output_ids=req.output_ids, prompt_ids=req.prompt_ids,
            generator=req.generator if req.generator is not None else shared_generator,
            banned_ids=banned, top_logprobs_num=req.top_logprobs_num if req.return_logprob else 0,
            return_logprob=req.return_logprob,
        )

    def record_prompt_logprobs(self, reqs: list[Req], plan: ExtendPlan, logits: torch.Tensor) -> None:
        """Prompt-token logprobs (raw model distribution) for the positions computed this pass."""
        for span in plan.prompt_spans:
            req = reqs[span.req_index]
            if span.first_token == 1 and req.logprob_start_len == 0 and not req.input_logprobs:
                req.input_logprobs.append((None, req.prompt_ids[0], None))
                req.input_top_logprobs.append(None)
            targets = req.prompt_ids[span.first_token : span.first_token + span.count]
            out = logprobs_of(logits[span.offset : span.offset + span.count], targets, req.top_logprobs_num)
            req.input_logprobs.extend((lp, t, None) for lp, t in zip(out.logprobs, targets))
            if req.top_logprobs_num:
                req.input_top_logprobs.extend([(v, i, None) for v, i in row] for row in out.top_logprobs)
            else:
                req.input_top_logprobs.extend([None] * span.count)
        for req in reqs:  # start == 0 with a one-token prompt has no span at all
            if req.wants_prompt_logprobs and req.logprob_start_len == 0 and not req.input_logprobs:
                req.input_logprobs.append((None, req.prompt_ids[0], None))
                req.input_top_logprobs.append(None)

    # ---- finishing ------------------------------------------------------------------------------
    def append_token(self, req: Req, tok: int, context_len: int) -> tuple[FinishReason | None, object]:
        """Append a sampled token; return why the request finished, if it did, and what matched."""
        p = req.params
        req.output_ids.append(tok)
        if req.matcher is not None:
            if not req.matcher.accept_token(tok):
                return FinishReason.ABORT, f"internal error: the grammar rejected sampled token {tok}"
            if req.matcher.is_terminated():  # the grammar took its stop token: done, even with ignore_eos
                return FinishReason.EOS, tok
        if tok in p.stop_token_ids:
            return FinishReason.STOP_TOKEN, tok
        if not p.ignore_eos and tok in self.eos_ids:
            return FinishReason.EOS, tok
        reason = self._text_and_length(req, tok, context_len)
        if reason[0] is None and req.matcher is not None and req.jump_forward:
            return self._jump_forward(req, context_len)
        return reason

    def _text_and_length(self, req: Req, tok: int, context_len: int) -> tuple[FinishReason | None, object]:
        if req.decoder is not None:
            step = req.decoder.push(tok)
            req.pending_text += step.delta
            if step.stop_matched is not None:
                return FinishReason.STOP_STR, step.stop_matched
        if req.remaining_new_tokens == 0 or req.seq_len >= context_len:
            return FinishReason.LENGTH, None
        return None, None

    def _jump_forward(self, req: Req, context_len: int) -> tuple[FinishReason | None, object]:
        """Append the text the grammar forces next as tokens at once (their K/V is computed by
        the next pass as one extend), instead of one decode step per token. The forced text is
        tokenized on its own; only the tokens the grammar accepts are taken, so the output stays
        a sequence the token-by-token decoder could also have produced."""
        forced = req.matcher.forced_string()
        if not forced:
            return None, None
        for tok in self.tokenizer.encode(forced)[: max(0, req.remaining_new_tokens - 1)]:
            if not req.matcher.accept_token(tok):
                break
            req.output_ids.append(tok)
            req.jumped_tokens += 1
            reason = self._text_and_length(req, tok, context_len)
            if reason[0] is not None:
                return reason
        return None, None

    def emit_progress(self, req: Req) -> None:
        if not req.stream:
            return
        start = req.sent_ids
        delta_ids = req.output_ids[start:]
        req.sent_ids = len(req.output_ids)
        text, req.pending_text = req.pending_text, ""
        meta = {}
        if req.return_logprob:  # the new tokens' logprobs travel with them
            meta["output_token_logprobs"] = req.output_logprobs[start:]
            if req.top_logprobs_num:
                meta["output_top_logprobs"] = req.output_top_logprobs[start:]
        self.on_output(RequestOutput(req.rid, text, delta_ids, False, meta))

    def emit(self, req: Req, error: str | None = None) -> None:
        """The final message of a request (finished, aborted or failed)."""
        delta_ids = req.output_ids[req.sent_ids :]
        req.sent_ids = len(req.output_ids)
        if req.decoder is None:
            text = self._whole_text(req)
        else:
            if req.finish != FinishReason.STOP_STR:  # release text held back as a possible stop prefix
                req.pending_text += req.decoder.flush()
            text = req.pending_text if req.stream else req.decoder.text
        req.pending_text = ""
        full_text = req.decoder.text if req.decoder is not None else text
        meta = self.meta_info(req)
        if req.params.json_schema is not None and req.finish != FinishReason.ABORT:
            meta["valid"], meta["validation_error"] = validate_json(full_text, req.params.json_schema)
        self.on_output(RequestOutput(req.rid, text, delta_ids, True, meta, error=error))

    def _whole_text(self, req: Req) -> str:
        ids = req.output_ids
        if req.finish in (FinishReason.EOS, FinishReason.STOP_TOKEN):  # the ending token is not text
            ids = ids[:-1]
        return decode_output(self.tokenizer, ids, req.params.skip_special_tokens, req.prompt_ids[-PROMPT_TAIL:])

    def meta_info(self, req: Req) -> dict:
        meta = {
            "id": req.rid,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "jump_forward_tokens": req.jumped_tokens,
            "finish_reason": req.finish_reason_dict(),
        }
        if req.return_logprob:
            meta["output_token_logprobs"] = list(req.output_logprobs)
            if req.top_logprobs_num:
                meta["output_top_logprobs"] = list(req.output_top_logprobs)
            if req.logprob_start_len >= 0:
                meta["input_token_logprobs"] = list(req.input_logprobs)
                if req.top_logprobs_num:
                    meta["input_top_logprobs"] = list(req.input_top_logprobs)
        return meta
