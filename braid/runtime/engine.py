"""The engine front: validates and tokenizes requests, hands them to the scheduler thread, and
gathers or streams the results. Public API: see shared/API.md (``generate``, ``async_generate``,
``shutdown``, context manager)."""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from braid.config import EngineConfig
from braid.errors import EngineClosedError, InvalidRequestError, RequestFailedError
from braid.runtime.constraints import Constraints
from braid.runtime.messages import (
    AbortRequest,
    AddBatch,
    AddRequest,
    FlushCache,
    GetStats,
    RequestOutput,
    Shutdown,
    new_rid,
)
from braid.runtime.model_runner import ModelRunner
from braid.runtime.model_source import resolve_model_path
from braid.runtime.policy import POLICIES
from braid.runtime.requests_in import GenerateInput, normalize_generate_args
from braid.runtime.scheduler import Scheduler
from braid.runtime.tokenizer import Tokenizer
from braid.runtime.tp_worker import WorkerProcesses, start_tensor_parallel, stop_tensor_parallel

log = logging.getLogger("braid.engine")


class Engine:
    """An in-process serving engine. The scheduler runs on its own thread (see docs/architecture.md).

    ``Engine(model_path=None, **config)``: every keyword is a field of :class:`EngineConfig`.
    With ``tp_size > 1`` this process is tensor-parallel rank 0 and the engine starts this node's
    other ranks as worker processes (docs/scale-out.md); ``shutdown`` stops them.
    """

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        try:
            self.config = EngineConfig(model_path=model_path, **kwargs)
        except TypeError as exc:
            known = ", ".join(f for f in EngineConfig.__dataclass_fields__)
            raise InvalidRequestError("Engine(...)", f"{exc}; known settings: {known}") from None
        POLICIES.get(self.config.schedule_policy)  # unknown names fail before the model loads
        folder = resolve_model_path(self.config.model_path, self.config.resolved_cache_dir)
        self.tokenizer = Tokenizer(folder)
        self._tp_workers: WorkerProcesses | None = None
        if self.config.tp_size > 1:
            self.runner, self._tp_workers = start_tensor_parallel(self.config, folder)
        else:
            self.runner = ModelRunner(self.config, folder)
        self.model_folder = folder
        try:
            self.constraints = Constraints(self.config.grammar_backend, self.tokenizer,
                                           self.runner.info.vocab_size, self.config.grammar_compile_timeout,
                                           pin_masks=self.runner.device.type == "cuda")
            self.scheduler = Scheduler(self.config, self.runner, self.tokenizer, self.constraints, self._deliver)
        except BaseException:
            if self._tp_workers is not None:  # no forward ran yet: the workers can be told to stop
                stop_tensor_parallel(self.runner, self._tp_workers, scheduler_done=True)
            raise
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._run_scheduler, name="braid-scheduler", daemon=True)
        self._thread.start()

    # ---- info -------------------------------------------------------------------------------------
    @property
    def context_len(self) -> int:
        return self.scheduler.context_len

    @property
    def vocab_size(self) -> int:
        return self.runner.info.vocab_size

    @property
    def model_name(self) -> str:
        """The model's name as servers report it: its folder's (or .gguf file's) name."""
        path = self.config.model_path or self.model_folder
        return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]

    @property
    def is_alive(self) -> bool:
        workers_ok = self._tp_workers is None or self._tp_workers.all_alive()
        return not self._closed and self._thread.is_alive() and workers_ok

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int | list[int] = -1,
        stream: bool = False,
    ) -> Any:
        """Generate for one prompt (returns a dict) or a list (returns a list, in order).

        ``logprob_start_len`` may be a list with one value per prompt. A list of prompts reaches
        the scheduler as one message, so its requests are admitted together.

        ``stream=True`` (single prompt, n == 1) returns an iterator of dicts whose ``text`` pieces
        concatenate to the final text; the last one carries ``meta_info`` with ``finish_reason``.
        """
        inp = normalize_generate_args(
            self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len, stream
        )
        if stream:
            return self._stream(inp.items[0])
        results = self._run_all(inp)
        return results if inp.is_batch or inp.n > 1 else results[0]

    def chat(
        self, messages: list[dict] | list[list[dict]], sampling_params: dict | list[dict] | None = None, **kwargs: Any
    ) -> Any:
        """``generate`` on conversations rendered with the model's chat template (as vLLM's
        ``LLM.chat``). ``messages``: one conversation (list of {"role", "content"}) or a list of them.
        ``generate`` itself sends prompts as they are, like SGLang's engine."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.tokenizer.apply_chat_template(c) for c in convs]
        return self.generate(
            prompt=prompts if convs is messages else prompts[0], sampling_params=sampling_params, **kwargs
        )

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int | list[int] = -1,
        stream: bool = False,
    ) -> Any:
        """As ``generate``, for asyncio callers; ``stream=True`` returns an async iterator.

        Validation, tokenization and grammar compiles run on a worker thread, so the event loop
        stays free; a bad request raises here, before anything is queued (or streamed)."""
        inp = await asyncio.to_thread(
            normalize_generate_args,
            self, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, logprob_start_len, stream,
        )
        if stream:
            return self._astream(inp.items[0])
        if inp.n > 1:
            await asyncio.gather(*(self._acollect(m) for m in inp.warmups))
        results = await asyncio.gather(*(self._acollect(m) for m in inp.items))
        return list(results) if inp.is_batch or inp.n > 1 else results[0]

    def get_stats(self) -> dict:
        """Scheduler counters and KV pool state, read on the scheduler thread (consistent)."""
        q: queue.Queue = queue.Queue()
        msg = GetStats(new_rid())
        self._submit(msg, q.put)
        return q.get().meta_info

    def flush_cache(self) -> None:
        self._submit(FlushCache())

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.scheduler.inbox.put(Shutdown())
        self._thread.join(timeout=30)
        done = not self._thread.is_alive()
        if self._tp_workers is not None:
            stop_tensor_parallel(self.runner, self._tp_workers, scheduler_done=done)
        if done:  # the scheduler is done with the device: free its memory now,
            self.runner.release()  # not whenever the last reference to this engine goes

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:  # best effort; shutdown() is the contract
        if getattr(self, "_thread", None) is not None and not self._closed:
            self.scheduler.inbox.put(Shutdown())

    # ---- plumbing -----------------------------------------------------------------------------------
    def _run_scheduler(self) -> None:
        try:
            self.scheduler.run_forever()
        except BaseException:
            log.exception("scheduler thread died")
            self._closed = True
            with self._lock:
                sinks = list(self._sinks.items())
            for rid, sink in sinks:
                sink(RequestOutput(rid, "", [], True, {}, error="engine scheduler thread died"))

    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            sink = self._sinks.get(out.rid)
            if out.finished:
                self._sinks.pop(out.rid, None)
        if sink is not None:
            sink(out)

    def _submit(self, msg: Any, sink: Callable[[RequestOutput], None] | None = None) -> None:
        if self._closed or not self._thread.is_alive():
            raise EngineClosedError("the engine is shut down")
        if sink is not None:
            with self._lock:
                self._sinks[msg.rid] = sink
        self.scheduler.inbox.put(msg)

    def _run_all(self, inp: GenerateInput) -> list[dict]:
        if inp.n > 1:  # prefill each prompt once; the n samples then share its cached KV
            self._wait_all(inp.warmups)
        return self._wait_all(inp.items)

    def _wait_all(self, msgs: list[AddRequest]) -> list[dict]:
        queues: list[queue.Queue] = [queue.Queue() for _ in msgs]
        if self._closed or not self._thread.is_alive():
            raise EngineClosedError("the engine is shut down")
        with self._lock:
            for msg, q in zip(msgs, queues):
                self._sinks[msg.rid] = q.put
        self.scheduler.inbox.put(msgs[0] if len(msgs) == 1 else AddBatch(list(msgs)))
        outs: list[RequestOutput] = []
        try:
            for q in queues:
                outs.append(q.get())
        except BaseException:  # e.g. KeyboardInterrupt: nobody will read the rest, free their KV
            self._abort_quietly(msgs[len(outs) :])
            raise
        return [_final(out, msg) for out, msg in zip(outs, msgs)]

    def _abort_quietly(self, msgs: list[AddRequest]) -> None:
        if not self._closed:
            for msg in msgs:
                self._submit(AbortRequest(msg.rid))

    def _stream(self, msg: AddRequest) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        self._submit(msg, q.put)
        done = False
        try:
            while not done:
                out = q.get()
                done = out.finished
                yield _chunk(out, msg)
        finally:
            if not done:  # the caller stopped iterating: free the request's KV
                self._abort_quietly([msg])

    async def _acollect(self, msg: AddRequest) -> dict:
        q = self._async_queue(msg)
        try:
            out = await q.get()
        except asyncio.CancelledError:  # the awaiting task was cancelled (e.g. a client went away)
            self._abort_quietly([msg])
            raise
        return _final(out, msg)

    async def _astream(self, msg: AddRequest) -> AsyncIterator[dict]:
        q = self._async_queue(msg)
        done = False
        try:
            while not done:
                out = await q.get()
                done = out.finished
                yield _chunk(out, msg)
        finally:
            if not done:
                self._abort_quietly([msg])

    def _async_queue(self, msg: AddRequest) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        self._submit(msg, lambda out: loop.call_soon_threadsafe(q.put_nowait, out))
        return q

    def abort(self, rid: str) -> None:
        self._submit(AbortRequest(rid))


def _final(out: RequestOutput, msg: AddRequest) -> dict:
    if out.error is not None:
        closed = "shut down" in out.error or "died" in out.error
        raise EngineClosedError(out.error) if closed else RequestFailedError(out.error)
    return {"text": out.delta_text, "output_ids": out.delta_ids, "meta_info": out.meta_info}


def _chunk(out: RequestOutput, msg: AddRequest) -> dict:
    if out.error is not None:
        _final(out, msg)
    return {"text": out.delta_text, "output_ids": out.delta_ids, "meta_info": out.meta_info}
