"""Ray Data LLM's HTTP processor (``ray.data.llm.HttpRequestProcessorConfig``) pointed at a real
``braid serve`` on the default model, through examples/ray_data_llm.py: schema-constrained chat
requests for a handful of documents on a local Ray (loopback, 2 CPUs). Every document comes back
once under its id, as schema-valid data or as an error that says why; a server that does not
answer fails the job."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from braid.net import free_port
from tests.integration.conftest import API_KEY, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ray_data_llm.py"
TEXTS = [
    "Maria Lopez is 34 years old and lives in Madrid, where she works as a nurse.",
    "At 71, retired teacher John Smith still walks his dog every morning in Boston.",
    "Kenji Tanaka, a 25-year-old engineer from Osaka, just started his first job.",
    "Ann Lee, a 50-year-old music teacher, lives in Lyon.",
]
TOO_LONG = "word " * 10_000  # past the 8192-token context: the server refuses it with a 400


@pytest.fixture(scope="module")
def stack(smollm2_hf_dir):
    """A braid serve and a local Ray, started side by side (each takes seconds): (server, ray)."""
    pytest.importorskip("ray.data.llm", reason='needs pip install "braid[ray]" (ray[data], aiohttp)')
    import ray

    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(1) as pool:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback, for this test only
        starting = pool.submit(start_server, smollm2_hf_dir)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        except BaseException:
            stop_server(starting.result())
            raise
        try:
            srv = starting.result()
        except BaseException:
            ray.shutdown()
            raise
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            yield srv, ray
        finally:
            stop_server(srv)
            ray.shutdown()


@pytest.fixture(scope="module")
def served(stack):
    return stack[0]


@pytest.fixture(scope="module")
def example(stack):
    """examples/ray_data_llm.py as a module; its functions travel to the Ray workers by value,
    since the workers cannot import a file outside a package."""
    ray = stack[1]
    spec = importlib.util.spec_from_file_location("braid_example_ray_data_llm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)
    yield module
    ray.cloudpickle.unregister_pickle_by_value(module)
    sys.modules.pop(spec.name, None)


def _records(path: Path) -> dict[str, dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    records = {r["id"]: r for r in map(json.loads, lines)}
    assert len(records) == len(lines), "an id came back twice"
    return records


def test_schema_constrained_records_for_every_id(tmp_path, served, example):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "records.jsonl"
    texts = {f"doc-{i}": TEXTS[i % len(TEXTS)] for i in range(8)} | {"doc-long": TOO_LONG}
    docs.write_text("".join(json.dumps({"id": k, "text": t, "source": "test"}) + "\n" for k, t in texts.items()))
    start = time.monotonic()
    totals = example.run(served.url, str(docs), str(out), example.PERSON, api_key=API_KEY, max_tokens=64,
                         concurrency=2, batch_size=2)
    print(f"ray data llm: {totals} ({time.monotonic() - start:.1f} s)")
    records = _records(out)
    assert sorted(records) == sorted(texts)  # every id once: none lost, none invented
    for doc_id in texts.keys() - {"doc-long"}:
        assert "data" in records[doc_id], records[doc_id]
        jsonschema.validate(records[doc_id]["data"], example.PERSON)
    # the server's 400 became this document's error record, naming the problem
    assert records["doc-long"].keys() == {"id", "error"}
    assert "context length" in records["doc-long"]["error"], records["doc-long"]
    assert totals["documents"] == 9 and totals["errors"] == 1
    assert totals["cached_tokens"] > 0  # the shared system prompt came from the radix cache
    assert not (tmp_path / "records.jsonl.tmp").exists()


def test_a_bad_request_field_is_an_error_record_not_a_gap(tmp_path, served, example, stack):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": TEXTS[i]}) + "\n" for i in range(2)))
    processor = example.build_extractor(served.url, example.PERSON, api_key=API_KEY, concurrency=1,
                                        overrides={"logprobs": True, "top_logprobs": 50})
    rows = processor(stack[1].data.read_json(str(docs), lines=True)).take_all()
    assert sorted(r["id"] for r in rows) == ["d0", "d1"]
    for row in rows:
        record = json.loads(row["record"])
        assert not row["ok"] and "top_logprobs" in record["error"], record


def test_a_server_that_does_not_answer_fails_the_job(tmp_path, example, stack):
    port = free_port()  # a port nobody listens on
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d0", "text": TEXTS[0]}) + "\n")
    processor = example.build_extractor(f"http://127.0.0.1:{port}", example.PERSON, model="m", concurrency=1,
                                        max_retries=0)
    start = time.monotonic()
    with pytest.raises(Exception, match="Reached maximum retries"):
        processor(stack[1].data.read_json(str(docs), lines=True)).take_all()
    assert time.monotonic() - start < 60
