"""``braid extract``: one JSON schema over many documents, one validated record per document.

Each document becomes one braid program: the instruction and the schema (a system message, the
same for every document, so the radix cache computes it once), the document (a user message),
then a gen constrained by the schema. Documents run concurrently, up to ``window`` in flight, so
the engine's batch stays full; each record is written as soon as its document finishes.

Everything that can be checked is checked before any work: the schema (a JSON schema, and it
compiles on the backend), every input document, the output path. Rerunning with the same output
resumes (``braid.jobs.output``). A document that fails gets an error record naming why; only a
backend that is gone (a dead engine, an endpoint that does not answer) stops the job, and then
the documents it did not finish are simply not written, for the rerun to do.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from braid.backend import RuntimeEndpoint
from braid.errors import BraidError, EngineClosedError, InvalidRequestError
from braid.grammar.validate import validate_json
from braid.jobs.documents import Document, DocumentSource, iter_documents, scan
from braid.jobs.output import OutputFile
from braid.lang import assistant, gen, program, system, user
from braid.lang.program import resolve_backend

DEFAULT_INSTRUCTION = (
    "Extract the information in the user's document as JSON that follows the schema below. "
    "Use only what the document states."
)
# documents in flight: an Engine admits up to max_running_requests (256 by default) at once;
# a remote server is shared with other clients
DEFAULT_WINDOW = {"engine": 256, "endpoint": 64}
PARTIAL_SHOWN = 200  # characters of a cut-off output quoted in its error


@dataclass(frozen=True)
class ExtractSettings:
    """What every document's program needs (picklable: Ray workers get a copy)."""

    schema_text: str
    instruction: str = DEFAULT_INSTRUCTION
    max_new_tokens: int = 512
    temperature: float = 0.0

    @functools.cached_property  # built once, read by every document's program
    def system_prompt(self) -> str:
        return f"{self.instruction}\n\nJSON schema:\n{self.schema_text}"


@program
def extract_document(s, system_prompt, document, schema, max_tokens, temperature):
    s += system(system_prompt)
    s += user(document)
    s += assistant(gen("data", json_schema=schema, max_tokens=max_tokens, temperature=temperature))


@dataclass
class DocumentResult:
    """A finished document: its output record and the token counts behind it."""

    record: dict[str, Any]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_kind: str | None = None  # "cut off" | "invalid" | "failed"


def run_document(backend, settings: ExtractSettings, doc: Document) -> DocumentResult:
    """Run one document's program; raises only when the backend is gone (the job must stop)."""
    doc_id = json.loads(doc.key)
    try:
        state = extract_document.run(settings.system_prompt, doc.text, settings.schema_text,
                                     settings.max_new_tokens, settings.temperature, backend=backend)
        text, meta = state["data"], state.get_meta_info("data")
    except Exception as exc:  # noqa: BLE001 (every failure of one document becomes its error record)
        if _backend_gone(exc):
            raise
        return DocumentResult({"id": doc_id, "error": f"failed: {_cause_message(exc)}"}, error_kind="failed")
    counts = dict(prompt_tokens=meta.get("prompt_tokens", 0), completion_tokens=meta.get("completion_tokens", 0),
                  cached_tokens=meta.get("cached_tokens", 0))
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason == "length":
        error = (f"cut off by max_new_tokens ({settings.max_new_tokens}) before the JSON was complete: "
                 f"{text[:PARTIAL_SHOWN]!r}")
        return DocumentResult({"id": doc_id, "error": error}, error_kind="cut off", **counts)
    if reason == "abort":
        error = f"failed: aborted: {meta['finish_reason'].get('message')}"
        return DocumentResult({"id": doc_id, "error": error}, error_kind="failed", **counts)
    valid, problem = validate_json(text, settings.schema_text)  # whatever the backend said
    if not valid:
        return DocumentResult({"id": doc_id, "error": f"invalid: {problem}"}, error_kind="invalid", **counts)
    return DocumentResult({"id": doc_id, "data": json.loads(text)}, **counts)


def run_window(backend, settings: ExtractSettings, docs: Iterable[Document], window: int,
               on_result: Callable[[DocumentResult], None]) -> None:
    """Run ``docs`` with up to ``window`` in flight, calling ``on_result`` (from worker threads,
    one at a time) as each finishes. If the backend is gone, stops taking documents, lets those
    in flight finish, and raises that error."""
    slots = threading.BoundedSemaphore(window)
    report = threading.Lock()
    fatal: list[BaseException] = []

    def one(doc: Document) -> None:
        try:
            result = run_document(backend, settings, doc)
            with report:
                on_result(result)
        except BaseException as exc:  # the backend is gone, or on_result failed (disk full, ...)
            fatal.append(exc)
        finally:
            slots.release()

    with ThreadPoolExecutor(max_workers=window, thread_name_prefix="braid-extract") as pool:
        for doc in docs:
            slots.acquire()
            if fatal:
                break
            pool.submit(one, doc)
    if fatal:
        raise fatal[0]


@dataclass
class ExtractSummary:
    """What a job did. ``documents`` counts the input (after ``limit``); ``skipped`` were already
    in the output; ``processed`` ran now, ``ok + errors == processed``."""

    documents: int = 0
    skipped: int = 0
    processed: int = 0
    ok: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    seconds: float = 0.0
    repaired_bytes: int = 0
    output: str = ""

    @property
    def valid_fraction(self) -> float:
        return self.ok / self.processed if self.processed else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def documents_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dict(vars(self))
        out.update(valid_fraction=self.valid_fraction, cache_hit_rate=self.cache_hit_rate,
                   documents_per_s=self.documents_per_s, output_tokens_per_s=self.output_tokens_per_s)
        return out

    def format(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.error_kinds.items()))
        lines = [
            f"documents:  {self.documents} ({self.skipped} already in {self.output}, {self.processed} processed now)",
            f"records:    {self.ok} valid data, {self.errors} errors" + (f" ({kinds})" if kinds else ""),
            f"valid:      {100 * self.valid_fraction:.1f}% of processed documents",
            f"cache hits: {100 * self.cache_hit_rate:.1f}% of prompt tokens",
            f"time:       {self.seconds:.1f} s, {self.documents_per_s:.2f} documents/s, "
            f"{self.output_tokens_per_s:.0f} output tokens/s",
        ]
        if self.repaired_bytes:
            lines.append(f"repaired:   cut a partial last line ({self.repaired_bytes} bytes) left by an earlier crash")
        return "\n".join(lines)


class Tally:
    """Writes results and counts them, with an optional progress bar."""

    def __init__(self, out: OutputFile, summary: ExtractSummary, total: int, progress: bool) -> None:
        self.out = out
        self.summary = summary
        self.kinds: Counter[str] = Counter()
        self.started = time.perf_counter()
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="doc", desc="extract", dynamic_ncols=True)

    def __call__(self, result: DocumentResult) -> None:
        self.out.write(result.record)
        s = self.summary
        s.processed += 1
        s.prompt_tokens += result.prompt_tokens
        s.completion_tokens += result.completion_tokens
        s.cached_tokens += result.cached_tokens
        if result.error_kind is None:
            s.ok += 1
        else:
            s.errors += 1
            self.kinds[result.error_kind] += 1
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix(errors=s.errors, tok_s=f"{s.completion_tokens / elapsed:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.summary.seconds = time.perf_counter() - self.started
        self.summary.error_kinds = dict(self.kinds)
        if self.bar is not None:
            self.bar.close()


def load_schema(schema: Any) -> str:
    """The schema as JSON text, from a dict, a Pydantic model class, JSON text, a .json file path
    or ``module:Attribute`` (a Pydantic model class or a dict); checked against its metaschema."""
    if isinstance(schema, str) and not schema.lstrip().startswith("{"):
        schema = _schema_from_reference(schema)
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
        schema = schema.model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError("schema", f"not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("schema", f"expected a JSON object (a JSON schema), got {type(schema).__name__}")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidRequestError("schema", f"not a valid JSON schema at {where}: {exc.message}") from None
    return json.dumps(schema, ensure_ascii=False)


def _schema_from_reference(ref: str) -> Any:
    if os.path.exists(ref) or ref.endswith(".json") or ":" not in ref:
        try:
            with open(ref, encoding="utf-8") as f:
                return f.read()
        except OSError as exc:
            raise InvalidRequestError("schema", f"cannot read {ref}: {exc.strerror or exc}") from None
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidRequestError("schema", f"cannot import {module_name!r} (from {ref!r}): {exc}") from None
    if not hasattr(module, attr):
        raise InvalidRequestError("schema", f"module {module_name!r} has no attribute {attr!r}")
    value = getattr(module, attr)
    if not (isinstance(value, dict) or (isinstance(value, type) and hasattr(value, "model_json_schema"))):
        raise InvalidRequestError("schema", f"{ref} is a {type(value).__name__}; expected a Pydantic model class "
                                            "or a dict")
    return value


def settings_for(schema: Any, instruction: str | None, prompt_file: str | None, max_new_tokens: int,
                 temperature: float) -> ExtractSettings:
    if instruction is not None and prompt_file is not None:
        raise InvalidRequestError("instruction", "give an instruction or a prompt file, not both")
    if prompt_file is not None:
        try:
            with open(prompt_file, encoding="utf-8") as f:
                instruction = f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError("prompt_file", f"cannot read {prompt_file}: {exc}") from None
    if instruction is not None and not instruction.strip():
        raise InvalidRequestError("instruction", "is empty")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidRequestError("max_new_tokens", f"expected an integer >= 1, got {max_new_tokens!r}")
    return ExtractSettings(load_schema(schema), instruction or DEFAULT_INSTRUCTION, max_new_tokens,
                           float(temperature))


def check_compiles(backend, settings: ExtractSettings) -> None:
    """Run the program once on an empty document for one token: a schema the backend cannot
    compile fails here, before any document (and the shared prefix lands in the cache)."""
    try:
        extract_document.run(settings.system_prompt, "", settings.schema_text, 1, settings.temperature,
                             backend=backend)
    except Exception as exc:  # noqa: BLE001 (classified below)
        if _backend_gone(exc):
            raise EngineClosedError(f"the backend does not answer: {_cause_message(exc)}") from None
        raise InvalidRequestError("schema", f"the backend cannot use it: {_cause_message(exc)}") from None


def extract(
    schema: Any,
    input: str,
    output: str,
    *,
    text_field: str = "text",
    id_field: str = "id",
    instruction: str | None = None,
    prompt_file: str | None = None,
    model_path: str | None = None,
    endpoint: str | None = None,
    api_key: str | None = None,
    backend: Any = None,
    engine_args: dict[str, Any] | None = None,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    limit: int | None = None,
    window: int | None = None,
    retry_errors: bool = False,
    ray: bool = False,
    ray_workers: int | None = None,
    ray_address: str | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Run ``schema`` over the documents in ``input`` (a .jsonl file, or a folder of .txt/.md
    files whose ids are their relative paths), appending one record per document to ``output``.

    The model: ``backend`` (an Engine or endpoint you hold), ``endpoint`` (a ``braid serve`` URL),
    or an Engine this call builds from ``model_path`` and ``engine_args`` (EngineConfig fields;
    the embedded default model when both are unset). ``ray=True`` runs the documents on Ray Data
    actors that each build that Engine (``braid.jobs.ray_data``). ``retry_errors`` redoes the
    documents whose records are errors. Returns the summary; bad arguments raise
    InvalidRequestError before any work.
    """
    settings = settings_for(schema, instruction, prompt_file, max_new_tokens, temperature)
    given = [name for name, v in (("backend", backend), ("endpoint", endpoint), ("model_path", model_path)) if v]
    if len(given) > 1:
        raise InvalidRequestError(given[1], f"give one of backend, endpoint, model_path; got {', '.join(given)}")
    if ray and (backend is not None or endpoint is not None):
        raise InvalidRequestError("ray", "Ray workers build their own engines: use model_path/engine_args, "
                                         "not backend or endpoint")
    if engine_args and (backend is not None or endpoint is not None):
        raise InvalidRequestError("engine_args", f"engine options ({', '.join(sorted(engine_args))}) apply to an "
                                                 f"engine this call builds, not to {given[0]}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise InvalidRequestError("window", f"expected an integer >= 1, got {window!r}")
    source = DocumentSource(input, text_field, id_field, limit)
    keys = scan(source)
    engine_args = dict(engine_args or {})
    if model_path is not None:
        engine_args["model_path"] = model_path
    with OutputFile(output) as out:
        if retry_errors:
            out.drop(out.errors & set(keys))
        pending = [k for k in keys if k not in out.done]
        summary = ExtractSummary(documents=len(keys), skipped=len(keys) - len(pending),
                                 repaired_bytes=out.repaired_bytes, output=output)
        if not pending:
            return summary
        todo = set(pending)
        docs = (d for d in iter_documents(source) if d.key in todo)
        if ray:
            from braid.jobs.ray_data import run_on_ray

            tally = Tally(out, summary, len(pending), progress)
            try:
                run_on_ray(settings, docs, engine_args, tally, window or DEFAULT_WINDOW["engine"], ray_workers,
                           ray_address)
            finally:
                tally.close()
            return summary
        owned = None
        if backend is None and endpoint is not None:
            backend = RuntimeEndpoint(endpoint, api_key=api_key)
        elif backend is None:
            from braid.runtime.engine import Engine

            backend = owned = Engine(**engine_args)
        try:
            kind = "endpoint" if endpoint is not None else "engine"
            target = resolve_backend(backend)
            check_compiles(target, settings)
            tally = Tally(out, summary, len(pending), progress)
            try:
                run_window(target, settings, docs, window or DEFAULT_WINDOW[kind], tally)
            finally:
                tally.close()
        finally:
            if owned is not None:
                owned.shutdown()
    return summary


def _backend_gone(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, EngineClosedError):
            return True
        exc = exc.__cause__
    return False


def _cause_message(exc: BaseException) -> str:
    """The innermost braid error's message (a ProgramError wraps the node's own error)."""
    inner = exc
    while inner.__cause__ is not None and isinstance(inner.__cause__, BraidError):
        inner = inner.__cause__
    return str(inner) or type(inner).__name__
