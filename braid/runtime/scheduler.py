"""The scheduler: continuous batching over one model, in its own thread.

Each step either extends (prefills the uncached part of) newly admitted requests, in chunks of at
most ``chunked_prefill_size`` tokens per batch, or decodes one token for every running request.
Admission follows the schedule policy under a token budget that keeps a reserve for the running
requests' future tokens. When KV runs out in decode, unlocked cache leaves are evicted first, then
the newest running requests are retracted to the waiting queue (their computed tokens stay cached,
so re-admission usually hits the cache). No request is ever dropped.

Threading: ``run_forever`` runs on the scheduler thread and is the only code that touches the
model, the pools and the requests. The front talks to it only through ``inbox`` (messages.py)
and receives ``RequestOutput`` through the ``on_output`` callback.
"""

from __future__ import annotations

import logging
import queue
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from braid.config import EngineConfig
from braid.radix_cache import RadixCache
from braid.runtime.batch import SharedPrefixes, build_extend_batch, decode_columns
from braid.runtime.constraints import Constraints
from braid.runtime.detokenizer import IncrementalDecoder
from braid.runtime.kv_manager import KVManager
from braid.runtime.memory import to_device
from braid.runtime.messages import AbortRequest, AddBatch, AddRequest, FlushCache, GetStats, RequestOutput, Shutdown
from braid.runtime.model_runner import CASCADE_MIN_SAVED, ModelRunner
from braid.runtime.outputs import PROMPT_TAIL, OutputProcessor
from braid.runtime.policy import POLICIES
from braid.runtime.request import FinishReason, Req
from braid.runtime.sampler import make_generator
from braid.runtime.sampling_params import SamplingParams

log = logging.getLogger("braid.scheduler")

# A waiting request sharing at least this many uncached tokens with one admitted in the same
# step waits one step, so that it reuses that request's KV instead of computing it twice.
IN_BATCH_SHARE_MIN = 32
# Reserve per running request is capped so that one huge max_new_tokens cannot block admission.
RESERVE_CLIP = 4096


@dataclass
class InFlight:
    """A decode step sampled on the device whose tokens the host has not taken yet (overlap)."""

    reqs: list[Req]  # the sampled requests, in the order of ``tokens``
    tokens: torch.Tensor  # (B,) int64 on the device: the next step's input ids
    host: torch.Tensor  # their copy on the host (pinned on CUDA), valid once ``done`` is reached
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, reqs: list[Req], tokens: torch.Tensor) -> InFlight:
        if tokens.device.type != "cuda":
            return cls(reqs, tokens, tokens, None)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(reqs, tokens, host, done)

    def token_list(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class Scheduler:
    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer, constraints: Constraints,
                 on_output: Callable[[RequestOutput], None]) -> None:
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.on_output = on_output
        self.context_len = runner.memory.context_len
        self.kv = KVManager(runner.memory.num_slots, config.max_running_requests + 1,
                            self.context_len, runner.device, config.disable_radix_cache)
        self.policy = POLICIES.get(config.schedule_policy)
        self.constraints = constraints
        self.outputs = OutputProcessor(tokenizer, constraints, on_output)
        self.inbox: queue.Queue = queue.Queue()
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # decode phase
        self.chunked: Req | None = None  # partially prefilled, continues next step
        self.shared_generator = make_generator(config.random_seed, runner.device)
        runner.capture_decode_graphs(self.kv.req_pool.table, self.kv.req_pool.padding_row)
        self._arrivals = 0
        self._stop = False
        # Overlap: a decode step is launched before the host takes the previous step's tokens, so
        # the host's bookkeeping runs while the GPU computes (docs/architecture.md, "Overlap").
        self.overlap = runner.device.type == "cuda" and not config.disable_overlap_schedule
        self.in_flight: InFlight | None = None
        # Overlap of extends: requests whose prefill ended, their first token sampled on the device
        # and not taken yet; they join ``running`` once the next pass is launched.
        self.joining: InFlight | None = None
        # cascade attention: the prefix each batch's requests share (all 0s where it saves little)
        self.shared_prefixes = SharedPrefixes(CASCADE_MIN_SAVED) if runner.uses_cascade else None
        self.stats = {"prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "retractions": 0}

    # ---- loop ---------------------------------------------------------------------------------
    def run_forever(self) -> None:
        while not self._stop:
            try:
                self._receive(block=not self.has_work)
                if self.has_work:
                    self.step()
            except Exception:  # a bookkeeping bug must not take every other request down with it
                log.error("scheduler loop error: %s", traceback.format_exc())

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.joining)

    @property
    def _joining_reqs(self) -> list[Req]:
        return [] if self.joining is None else [r for r in self.joining.reqs if not r.finished]

    def step(self) -> None:
        if self.in_flight is not None and (self.waiting or self.chunked or not self.running):
            self._take_in_flight()  # admission and extends see every request's latest token
        batch = self._schedule_extend()
        if not batch and self.joining is not None:  # the newly prefilled requests join this decode
            self._take_joining()
        reqs, joiners = (batch, self._joining_reqs) if batch else (list(self.running), [])
        if not reqs:
            return
        try:
            if batch:
                self._run_extend(batch)
            elif self.overlap and self._can_overlap():
                self._run_decode_overlapped()
            else:
                if self.in_flight is not None:
                    self._take_in_flight()
                self._run_decode()
        except Exception as exc:  # one bad batch must not kill the engine
            log.error("forward failed: %s", traceback.format_exc())
            self.in_flight = None
            self._rescue_joining(joiners, f"internal error: {exc!r}")
            for req in reqs:
                if not req.finished:
                    self._fail(req, f"internal error: {exc!r}")

    def _rescue_joining(self, joiners: list[Req], error: str) -> None:
        """After a failed extend: the previous extend's first tokens came from a pass that
        succeeded, so its requests still join ``running``; failed only if that fails too."""
        if self.joining is not None:
            try:
                self._take_joining()
            except Exception:
                log.error("taking first tokens failed: %s", traceback.format_exc())
        for req in joiners:
            if not req.finished and req not in self.running:
                self._fail(req, error)

    def _receive(self, block: bool) -> None:
        while True:
            try:
                msg = self.inbox.get(block=block, timeout=None)
            except queue.Empty:
                return
            block = False
            if isinstance(msg, (AddRequest, AddBatch)):
                for item in msg.items if isinstance(msg, AddBatch) else [msg]:
                    try:
                        self._add(item)
                    except Exception as exc:  # the front validates; this is a last line of defence
                        self.on_output(RequestOutput(item.rid, "", [], True, {}, error=f"bad request: {exc}"))
            elif isinstance(msg, AbortRequest):
                self._abort(msg.rid)
            elif isinstance(msg, GetStats):
                self.on_output(RequestOutput(msg.rid, "", [], True, self.stats_snapshot()))
            elif isinstance(msg, FlushCache):
                ok = not self.has_work and self.kv.flush()
                log.info("flush cache: %s", "done" if ok else "refused (requests running)")
            elif isinstance(msg, Shutdown):
                self._stop = True
                joining, self.in_flight, self.joining = self._joining_reqs, None, None
                for req in [*self.waiting, *self.running, *([self.chunked] if self.chunked else []), *joining]:
                    self._fail(req, "engine shut down")
                return

    # ---- requests in and out --------------------------------------------------------------------
    def _add(self, msg: AddRequest) -> None:
        params = SamplingParams.from_dict(msg.sampling)
        req = Req(rid=msg.rid, prompt_ids=list(msg.input_ids), params=params,
                  return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                  logprob_start_len=msg.logprob_start_len, stream=msg.stream)
        req.max_new_tokens = min(params.max_new_tokens, self.context_len - len(req.prompt_ids))
        if req.stream or params.stop:  # otherwise the text is decoded once, at the end
            req.decoder = IncrementalDecoder(self.tokenizer, list(params.stop),
                                             skip_special_tokens=params.skip_special_tokens,
                                             prompt_tail_ids=req.prompt_ids[-PROMPT_TAIL:])
        if req.max_new_tokens > 0:  # compiled already by the front: a cache hit
            req.matcher = self.constraints.matcher(params)
        # forced tokens are not sampled, so they have no logprobs: jump only when none are asked
        req.jump_forward = params.jump_forward and not self.config.disable_jump_forward and not msg.return_logprob
        req.generator = make_generator(params.seed, self.runner.device) if params.seed is not None else None
        req.arrival = self._arrivals
        self._arrivals += 1
        self.stats["prompt_tokens"] += len(req.prompt_ids)
        self.waiting.append(req)

    def _abort(self, rid: str) -> None:
        for group in (self.waiting, self.running):
            for req in group:
                if req.rid == rid:
                    group.remove(req)
                    self._finish(req, FinishReason.ABORT, "aborted by client")
                    return
        if self.chunked is not None and self.chunked.rid == rid:
            req, self.chunked = self.chunked, None
            self._finish(req, FinishReason.ABORT, "aborted by client")
            return
        for req in self._joining_reqs:  # its first token, in flight, is then dropped
            if req.rid == rid:
                self._finish(req, FinishReason.ABORT, "aborted by client")
                return

    def _finish(self, req: Req, reason: FinishReason, matched) -> None:
        req.finish, req.finish_matched = reason, matched
        self.kv.release(req)
        self.outputs.emit(req)

    def _fail(self, req: Req, message: str) -> None:
        for group in (self.waiting, self.running):
            if req in group:
                group.remove(req)
        if self.chunked is req:
            self.chunked = None
        if req.row is not None and req.extend_len:
            self.kv.discard(req, req.extend_len)
        req.extend_len = 0
        req.finish, req.finish_matched = FinishReason.ABORT, message
        self.kv.release(req)
        try:
            self.outputs.emit(req, error=message)
        except Exception:  # the request's own state is broken: still tell its caller
            log.error("emit failed for %s: %s", req.rid, traceback.format_exc())
            self.on_output(RequestOutput(req.rid, "", [], True, {}, error=message))

    # ---- admission ------------------------------------------------------------------------------
    def _match_limit(self, req: Req) -> int:
        # at least one token must be computed to get logits; prompt logprobs need their positions computed
        limit = req.seq_len - 1
        if req.wants_prompt_logprobs and not req.input_logprobs:
            limit = min(limit, max(req.logprob_start_len - 1, 0))
        return limit

    def _reserve(self, reqs: list[Req]) -> int:
        """Slots kept back for the future tokens of ``reqs`` (a fraction of what they may still generate)."""
        ratio = self.config.new_token_ratio
        return sum(int(min(r.remaining_new_tokens, RESERVE_CLIP) * ratio) for r in reqs)

    def _schedule_extend(self) -> list[Req]:
        budget = self.config.chunked_prefill_size
        budget = float("inf") if budget == -1 else budget
        admitted: list[Req] = []
        if self.chunked is not None:  # a chunked prefill continues first
            req, self.chunked = self.chunked, None
            if self.kv.available == 0:  # cannot progress: back to the queue, its KV stays cached
                self._retract(req)
            else:
                budget -= self._take_chunk(req, min(budget, self.kv.available))
                admitted.append(req)
        if not self.waiting or req_chunked_left(admitted):
            return admitted
        shared = RadixCache(device="cpu")
        cached = {id(r): self.kv.match(r.fill_ids[: self._match_limit(r)]) for r in self.waiting}
        live = self.running + self._joining_reqs  # the requests decoding from the next decode step on
        for req in self.policy(self.waiting, lambda r: cached[id(r)]):
            if budget <= 0 or len(live) + len(admitted) >= self.config.max_running_requests:
                break
            if len(shared.match_prefix(req.fill_ids).slots) - cached[id(req)] >= IN_BATCH_SHARE_MIN:
                continue
            self.kv.admit(req, self._match_limit(req))  # may match less than `cached` said: earlier
            todo = req.seq_len - req.kv_len  # admissions in this step can have evicted some of it
            chunk = int(min(todo, budget))
            # the reserve protects running requests; alone, a request only needs its chunk to fit
            alone = not live and not admitted
            reserve = 0 if alone or chunk < todo else self._reserve(live + admitted + [req])
            if not self.kv.can_allocate(chunk + reserve):
                self.kv.release(req)
                break
            self.waiting.remove(req)
            if req.retractions == 0:  # report the prompt's own cache hit, not a re-admission's
                req.cached_tokens = req.kv_len
                self.stats["cached_tokens"] += req.kv_len
            budget -= self._take_chunk(req, budget)
            shared.insert(req.fill_ids, torch.zeros(req.seq_len, dtype=torch.int64))
            admitted.append(req)
            if req_chunked_left(admitted):
                break
        return admitted

    def _take_chunk(self, req: Req, budget: float) -> int:
        n = int(min(req.seq_len - req.kv_len, budget))
        self.kv.extend(req, n)
        req.extend_len = n
        return n

    # ---- forward passes -------------------------------------------------------------------------
    def _run_extend(self, reqs: list[Req]) -> None:
        fb, plan = build_extend_batch(reqs, self.kv.req_pool.table, self.runner.device,
                                      self._shared(reqs))  # fmt: skip
        logits = self.runner.forward(fb)
        for req in reqs:
            req.kv_len += req.extend_len
            req.extend_len = 0
        self.outputs.record_prompt_logprobs(reqs, plan, logits)
        done = [r for r in reqs if r.kv_len == r.seq_len]
        for req in reqs:  # share the computed prefix now, not when the request finishes
            self.kv.cache_prefix(req)
            if req.kv_len < req.seq_len:
                self.chunked = req
        rows = logits[: plan.num_sampled] if done else None
        joining = None
        if self.overlap and done and not any(r.return_logprob for r in done):
            # sampled on the device; the host takes the tokens after launching the next pass
            done, rows = self._finish_unsampled(done, rows)
            if done:
                joining = InFlight.start(done, self.outputs.choose_tokens(done, rows, self.shared_generator))
        else:
            self._sample_and_advance(done, rows)
        if self.joining is not None:  # the previous extend's first tokens, taken while this one computes
            self._take_joining()
        self.joining = joining

    def _take_joining(self) -> None:
        prev, self.joining = self.joining, None
        self._advance(prev.reqs, prev.token_list(), new_to_running=True)

    def _run_decode(self) -> None:
        """One token for every running request; a request that jumped forward over a string its
        grammar forced has several uncomputed tokens, and the pass becomes a ragged extend."""
        self._make_room_for_decode()
        reqs = list(self.running)
        if not reqs:
            return
        for req in reqs:
            req.extend_len = req.seq_len - req.kv_len
        plain = all(req.extend_len == 1 for req in reqs)
        if plain:
            self.kv.extend_decode(reqs)
        else:
            for req in reqs:
                self.kv.extend(req, req.extend_len)
        # the grammar masks are filled on the mask thread while this thread launches the forward
        masks = self.outputs.constraints.prepare_masks([r for r in reqs if r.remaining_new_tokens > 0])
        if plain:
            logits = self.runner.decode(self._decode_columns(reqs), self.kv.req_pool.table)
        else:
            fb, plan = build_extend_batch(reqs, self.kv.req_pool.table, self.runner.device,
                                          self._shared(reqs))  # fmt: skip
            logits = self.runner.forward(fb)[: plan.num_sampled]
        for req in reqs:
            req.kv_len += req.extend_len
            req.extend_len = 0
        self._sample_and_advance(reqs, logits, masks, new_to_running=False)

    def _shared(self, reqs: list[Req]) -> list[int] | None:
        """The prefix ``reqs`` share, for cascade attention; None where it is off."""
        return None if self.shared_prefixes is None else self.shared_prefixes(reqs)

    def _decode_columns(self, reqs: list[Req]) -> list[list[int]]:
        return decode_columns(reqs, self._shared(reqs))

    def _can_overlap(self) -> bool:
        """The next decode can start before the in-flight tokens are taken: a plain decode of
        every running request (each was in the in-flight step, or is one token ahead of its
        KV), no logprobs (they are read on the host), and KV for all of them without retracting."""
        if self.in_flight is None:
            plain = all(r.seq_len - r.kv_len == 1 and not r.return_logprob for r in self.running)
        else:  # requests outside the in-flight step (a jump-forward) run the regular path first
            prev = {id(r) for r in self.in_flight.reqs}
            plain = all(id(r) in prev and r.seq_len == r.kv_len for r in self.running)
        return plain and bool(self.running) and self.kv.can_allocate(len(self.running))

    def _run_decode_overlapped(self) -> None:
        """Launch the decode of every running request, with the in-flight tokens as inputs
        straight from the device; then, while the GPU computes, take those tokens on the host
        (finish checks, text, streaming); then sample this step on the device and leave its
        tokens in flight."""
        reqs = list(self.running)
        prev, self.in_flight = self.in_flight, None
        input_ids = None
        if prev is not None:
            where = {id(r): i for i, r in enumerate(prev.reqs)}
            order = [where[id(r)] for r in reqs]
            same = order == list(range(len(prev.reqs)))
            input_ids = prev.tokens if same else prev.tokens[to_device(order, torch.int64, prev.tokens.device)]
        for req in reqs:  # a failed forward frees the step's slots by this (Scheduler._fail)
            req.extend_len = 1
        self.kv.extend_decode(reqs)  # a pending token sits at position kv_len, as a sampled one does
        logits = self.runner.decode(self._decode_columns(reqs), self.kv.req_pool.table, input_ids)
        for req in reqs:
            req.kv_len += 1
            req.extend_len = 0
        if prev is not None:
            self._advance(prev.reqs, prev.token_list(), new_to_running=False)
        # finished ones computed a row for nothing; a jump-forward request first extends its forced tokens
        ready = [i for i, r in enumerate(reqs) if not r.finished and r.kv_len == r.seq_len]
        if not ready:
            return
        if len(ready) < len(reqs):
            logits = logits[to_device(ready, torch.int64, logits.device)]
        ready_reqs = [reqs[i] for i in ready]
        self.in_flight = InFlight.start(ready_reqs, self.outputs.choose_tokens(ready_reqs, logits, self.shared_generator))

    def _take_in_flight(self) -> None:
        prev, self.in_flight = self.in_flight, None
        self._advance(prev.reqs, prev.token_list(), new_to_running=False)

    def _make_room_for_decode(self) -> None:
        """Retract the newest requests until every running request gets its slots."""
        while self.running and not self.kv.can_allocate(sum(r.seq_len - r.kv_len for r in self.running)):
            victim = max(self.running, key=lambda r: r.arrival)
            self.running.remove(victim)
            self._retract(victim)

    def _retract(self, req: Req) -> None:
        self.kv.release(req)
        req.retractions += 1
        self.stats["retractions"] += 1
        self.waiting.append(req)
        log.info("KV full: retracted %s (%d tokens)", req.rid, req.seq_len)

    def _sample_and_advance(self, reqs: list[Req], logits: torch.Tensor | None, masks=None,
                            new_to_running: bool = True) -> None:
        """Sample one token for each request whose fill_ids are all in KV, then finish or keep it
        (``new_to_running``: the requests come from an extend and join ``running``)."""
        reqs, logits = self._finish_unsampled(reqs, logits)
        if reqs:
            self._advance(reqs, self.outputs.sample(reqs, logits, self.shared_generator, masks), new_to_running)

    def _finish_unsampled(self, reqs: list[Req], logits: torch.Tensor | None) -> tuple[list[Req], torch.Tensor | None]:
        """Finish the requests that may generate nothing (max_new_tokens=0: prompt only, as logprob
        scoring and n>1 warm-ups are); the others, and a copy of their rows of ``logits`` (which
        the sampler may change in place)."""
        keep = [i for i, r in enumerate(reqs) if r.remaining_new_tokens > 0]
        for req in reqs:
            if req.remaining_new_tokens == 0:
                self._drop_running(req)
                self._finish(req, FinishReason.LENGTH, None)
        rows = logits[to_device(keep, torch.int64, logits.device)] if keep else None  # no wait for the GPU
        return [reqs[i] for i in keep], rows

    def _advance(self, reqs: list[Req], tokens: list[int], new_to_running: bool) -> None:
        """Append each request's sampled token, then finish it or keep it running."""
        for req, tok in zip(reqs, tokens):
            if req.finished:  # aborted while its token was in flight
                continue
            self.stats["generated_tokens"] += 1
            reason, matched = self.outputs.append_token(req, tok, self.context_len)
            if reason is not None:
                self._drop_running(req)
                self._finish(req, reason, matched)
            else:
                if new_to_running:
                    self.running.append(req)
                self.outputs.emit_progress(req)

    def _drop_running(self, req: Req) -> None:
        if req in self.running:
            self.running.remove(req)

    # ---- checks -----------------------------------------------------------------------------------
    def stats_snapshot(self) -> dict:
        """Counters and pool state; ``at_rest_error`` is the failed invariant check, if idle."""
        error = None
        if not self.has_work:
            try:
                self.kv.check_at_rest()
            except AssertionError as exc:
                error = str(exc)
        return {
            **self.stats,
            "running": len(self.running) + len(self._joining_reqs) + (1 if self.chunked else 0),
            "waiting": len(self.waiting),
            "pool_slots": self.kv.num_slots,
            "free_slots": self.kv.allocator.num_free,
            "evictable_slots": self.kv.tree.evictable_size,
            "locked_slots": self.kv.tree.protected_size,
            "context_len": self.context_len,
            "at_rest_error": error,
        }


def req_chunked_left(admitted: list[Req]) -> bool:
    """True when the last admitted request could not be prefilled whole this step."""
    return bool(admitted) and admitted[-1].kv_len + admitted[-1].extend_len < admitted[-1].seq_len
