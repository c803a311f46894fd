"""Schema-constrained batch extraction with Ray Data LLM against a running ``braid serve``.

Each document of a JSONL file (``{"id": ..., "text": ...}`` per line) becomes one
``/v1/chat/completions`` request with ``response_format`` of type ``json_schema``, sent by
``ray.data.llm``'s HTTP processor; every document gets one line in the output, in the records
of ``braid extract``: ``{"id", "data"}`` (checked against the schema here, whatever the server
said) or ``{"id", "error"}``. The system prompt (instruction + schema) is the same for every
document, so the server's radix cache computes it once.

    pip install "braid[ray]"
    braid serve --port 30000 &
    python examples/ray_data_llm.py http://127.0.0.1:30000 docs.jsonl records.jsonl

The output is written to a temporary file and renamed when complete; an output that exists is
left alone, so a loop over input shards skips the finished ones (docs/scale-out.md). The URL may
also be the SGLang router in front of several servers. Ray: ``RAY_ADDRESS``, else a local one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from braid.jobs.extract import DEFAULT_INSTRUCTION

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
PARTIAL_SHOWN = 200  # characters of a cut-off output quoted in its error


def chat_request(row: dict[str, Any], system_prompt: str, schema: dict, model: str | None, max_tokens: int,
                 overrides: dict[str, Any]) -> dict[str, Any]:
    """The preprocess: one document row -> the ``payload`` column the HTTP stage posts."""
    return {"payload": {
        "model": model,
        "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": row["text"]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}},
        "max_tokens": max_tokens,
        "temperature": 0,
        **overrides,
    }}


_VALIDATORS: dict[str, Any] = {}  # schema text -> its validator, built once per worker


def _validator(schema_text: str):
    import jsonschema  # not braid.grammar.validate: the Ray workers need not import torch

    if schema_text not in _VALIDATORS:
        schema = json.loads(schema_text)
        cls = jsonschema.validators.validator_for(schema)
        _VALIDATORS[schema_text] = cls(schema, format_checker=cls.FORMAT_CHECKER)
    return _VALIDATORS[schema_text]


def check(text: str, schema_text: str) -> str | None:
    """Why ``text`` is not JSON valid under the schema (formats checked); None if it is."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    error = jsonschema.exceptions.best_match(_validator(schema_text).iter_errors(value))
    return None if error is None else error.message


def to_record(row: dict[str, Any], schema_text: str, max_tokens: int) -> dict[str, Any]:
    """The postprocess: a row with its ``http_response`` -> the document's record (as JSON text,
    so every block has the same columns) and its token counts. The HTTP stage hands back error
    bodies (a 400) as responses: they become error records, never a dropped document."""
    resp, doc_id = row["http_response"], row["id"]
    usage = resp.get("usage") or {}
    counts = {"prompt_tokens": usage.get("prompt_tokens") or 0,
              "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
              "completion_tokens": usage.get("completion_tokens") or 0}
    if resp.get("error"):
        err = resp["error"]
        record = {"id": doc_id, "error": f"failed: {err.get('message')} (param: {err.get('param')})"}
    else:
        choice = resp["choices"][0]
        text = choice["message"]["content"] or ""
        if choice["finish_reason"] == "length":
            record = {"id": doc_id, "error": f"cut off by max_tokens ({max_tokens}) before the JSON was "
                                             f"complete: {text[:PARTIAL_SHOWN]!r}"}
        elif problem := check(text, schema_text):  # whatever the server said
            record = {"id": doc_id, "error": f"invalid: {problem}"}
        else:
            record = {"id": doc_id, "data": json.loads(text)}
    return {"id": doc_id, "record": json.dumps(record, ensure_ascii=False), "ok": "data" in record, **counts}


def served_model(url: str, headers: dict[str, str]) -> str:
    import httpx

    resp = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def build_extractor(url: str, schema: dict, *, api_key: str | None = None, model: str | None = None,
                    instruction: str = DEFAULT_INSTRUCTION, max_tokens: int = 256, concurrency: int = 4,
                    batch_size: int = 8, actor_cpus: float = 0.1, max_retries: int = 3,
                    overrides: dict[str, Any] | None = None):
    """A Ray Data LLM processor: documents (``id``, ``text``) -> (``id``, ``record``, ``ok``,
    token counts).

    The HTTP stage sends the requests of a batch one after another, and an actor works on a few
    batches at once (measured: two to four), so ``concurrency`` sets the requests in flight:
    raise it until the server's ``braid_running_requests`` gauge (``/metrics``) stays near its
    batch size (times the replicas behind a router). The pool is fixed (an autoscaling one
    starts with one actor). ``actor_cpus``: the actors only wait on sockets, and ``concurrency *
    actor_cpus`` must leave CPUs for the preprocess and postprocess tasks, or the pipeline
    stalls. ``max_retries`` covers 429/502/503/504 answers and dropped connections (a replica
    restarting); ``overrides`` are extra request fields."""
    from functools import partial

    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    schema_text = json.dumps(schema, ensure_ascii=False)
    config = HttpRequestProcessorConfig(
        url=f"{url}/v1/chat/completions", headers=headers, concurrency=(concurrency, concurrency),
        batch_size=batch_size, max_retries=max_retries, http_request_stage={"num_cpus": actor_cpus},
    )
    system_prompt = f"{instruction}\n\nJSON schema:\n{schema_text}"
    preprocess = partial(chat_request, system_prompt=system_prompt, schema=schema,
                         model=model or served_model(url, headers), max_tokens=max_tokens, overrides=overrides or {})
    return build_processor(config, preprocess=preprocess,
                           postprocess=partial(to_record, schema_text=schema_text, max_tokens=max_tokens))


def run(url: str, input_path: str, output_path: str, schema: dict, **kwargs: Any) -> dict[str, float]:
    """Run the documents of ``input_path`` through ``build_extractor`` and write ``output_path``
    (via a temporary file, renamed when every record is in). Returns the job's counts."""
    import ray.data

    start = time.perf_counter()
    dataset = ray.data.read_json(input_path, lines=True).select_columns(["id", "text"])
    totals = {"documents": 0, "errors": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0}
    tmp = f"{output_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        for row in build_extractor(url, schema, **kwargs)(dataset).iter_rows():
            out.write(row["record"] + "\n")
            totals["documents"] += 1
            totals["errors"] += not row["ok"]
            for key in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                totals[key] += row[key]
    os.replace(tmp, output_path)
    totals["seconds"] = time.perf_counter() - start
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="a braid serve (or the router in front of several): http://HOST:PORT")
    parser.add_argument("input", help="JSONL, one {id, text} object per line")
    parser.add_argument("output", help="JSONL of {id, data} / {id, error} records; skipped if it exists")
    parser.add_argument("--schema", help="a JSON schema file (default: name, age, city)")
    parser.add_argument("--api-key", default=os.environ.get("BRAID_API_KEY"))
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=4, help="HTTP actors (two to four requests in flight each)")
    args = parser.parse_args(argv)
    if os.path.exists(args.output):
        print(f"{args.output} exists: skipped")
        return
    schema = PERSON
    if args.schema:
        with open(args.schema, encoding="utf-8") as f:
            schema = json.load(f)
    t = run(args.url, args.input, args.output, schema, api_key=args.api_key, max_tokens=args.max_tokens,
            concurrency=args.concurrency)
    hit = t["cached_tokens"] / max(1, t["prompt_tokens"])
    print(f"{t['documents']} documents ({t['errors']} errors) in {t['seconds']:.1f} s: "
          f"{t['documents'] / t['seconds']:.2f} documents/s, cache hit rate {hit:.1%}")


if __name__ == "__main__":
    sys.exit(main())
