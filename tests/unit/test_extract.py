"""braid extract: input checks, the exactly-once output file, and jobs on the default model."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from braid.errors import InvalidRequestError
from braid.jobs import extract
from braid.jobs.documents import DocumentSource, iter_documents, scan
from braid.jobs.extract import load_schema
from braid.jobs.output import OutputFile

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 40},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
NAMES = ["Maria Lopez", "John Smith", "Kenji Tanaka", "Ann Lee", "Omar Haddad", "Lena Fischer", "Ivan Petrov"]
CITIES = ["Madrid", "Boston", "Osaka", "Lyon", "Cairo", "Berlin", "Kyiv", "Lima"]


def write_docs(path, count: int, id_of=lambda i: f"doc-{i}") -> list:
    ids = [id_of(i) for i in range(count)]
    with open(path, "w") as f:
        for i, doc_id in enumerate(ids):
            text = f"{NAMES[i % len(NAMES)]} is {18 + i % 60} years old and lives in {CITIES[i % len(CITIES)]}."
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    return ids


def read_records(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_schema(tmp_path, schema=SCHEMA) -> str:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    return str(path)


# ---- documents ----------------------------------------------------------------------------------
def test_jsonl_ids_keep_their_type_and_limit_counts_input_order(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"id": 7, "text": "a"}\n\n{"id": "7", "text": "b"}\n{"id": "x", "text": "c"}\n')
    assert scan(DocumentSource(str(path))) == ["7", '"7"', '"x"']  # 7 and "7" are distinct ids
    assert [d.text for d in iter_documents(DocumentSource(str(path), limit=2))] == ["a", "b"]


@pytest.mark.parametrize(("content", "problem"), [
    ('{"id": 1, "text": "a"}\n{"id": 2, "body": "b"}\n', "line 2 (id 2) has no 'text' field"),
    ('{"text": "a"}\n', "line 1 has no 'id' field"),
    ('{"id": 1, "text": "a"}\nnot json\n', "line 2 is not JSON"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"id": {"a": 1}, "text": "a"}\n', "the id must be a string or an integer"),
    ('{"id": 1, "text": 5}\n', "'text' must be a string"),
    ("", "holds no documents"),
])  # fmt: skip
def test_bad_jsonl_input_names_the_line_and_problem(tmp_path, content, problem):
    path = tmp_path / "docs.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidRequestError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        scan(DocumentSource(str(path)))


def test_duplicate_ids_are_named_with_their_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_docs(path, 6, id_of=lambda i: f"d{i % 4}")
    expected = r'duplicate ids .*"d0" \(line 1 and line 5\), "d1" \(line 2 and line 6\)'
    with pytest.raises(InvalidRequestError, match=expected):
        scan(DocumentSource(str(path)))


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InvalidRequestError, match="cannot read .*missing.jsonl: No such file"):
        scan(DocumentSource(str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": 1, "text": "caf\xe9"}\n')
    with pytest.raises(InvalidRequestError, match="line 1 is not UTF-8"):
        scan(DocumentSource(str(bad)))


def test_folder_input_ids_are_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "sub" / "b.md").write_text("second")
    (tmp_path / "skip.pdf").write_bytes(b"%PDF")
    source = DocumentSource(str(tmp_path))
    assert scan(source) == ['"a.txt"', '"sub/b.md"']
    assert [d.text for d in iter_documents(source)] == ["first", "second"]
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidRequestError, match="c.txt is not UTF-8"):
        scan(source)


# ---- output -------------------------------------------------------------------------------------
def test_output_cuts_a_partial_last_line_and_reads_done_ids(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "data": {}}\n{"id": 2, "error": "cut off"}\n{"id": "c", "da')
    with OutputFile(str(path)) as out:
        assert out.done == {'"a"', "2"} and out.errors == {"2"} and out.repaired_bytes == len('{"id": "c", "da')
        out.write({"id": "c", "data": {"x": 1}})
    assert read_records(path)[-1] == {"id": "c", "data": {"x": 1}}


def test_output_refuses_foreign_lines_a_missing_folder_and_a_second_writer(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text('{"id": "a", "data": {}}\n{"name": "not ours"}\n{"id": "b", "data": {}}\n')
    with pytest.raises(InvalidRequestError, match="line 2 is not an extract record"):
        OutputFile(str(path))
    with pytest.raises(InvalidRequestError, match="folder .*nowhere does not exist"):
        OutputFile(str(tmp_path / "nowhere" / "out.jsonl"))
    good = tmp_path / "good.jsonl"
    with OutputFile(str(good)) as first:
        first.write({"id": 1, "data": {}})
        with pytest.raises(InvalidRequestError, match="another job is writing"):
            OutputFile(str(good))


def test_output_drop_rewrites_without_the_dropped_records(tmp_path):
    path = tmp_path / "out.jsonl"
    with OutputFile(str(path)) as out:
        for i in range(4):
            out.write({"id": i, "error": "x"} if i % 2 else {"id": i, "data": {}})
        out.drop(out.errors)
        assert out.done == {"0", "2"} and not out.errors
        out.write({"id": 1, "data": {}})
    assert [r["id"] for r in read_records(path)] == [0, 2, 1]


def test_an_output_created_by_a_job_that_wrote_nothing_is_removed(tmp_path):
    path = tmp_path / "out.jsonl"
    OutputFile(str(path)).close()
    assert not path.exists()


# ---- schema -------------------------------------------------------------------------------------
def test_schema_sources(tmp_path):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int

    file_schema = json.loads(load_schema(write_schema(tmp_path)))
    assert file_schema == SCHEMA
    assert json.loads(load_schema(Point))["properties"]["x"]["type"] == "integer"
    assert json.loads(load_schema("tests.unit.test_extract:SCHEMA")) == SCHEMA  # module:attribute
    with pytest.raises(InvalidRequestError, match="not a valid JSON schema at properties/age/type"):
        load_schema({"type": "object", "properties": {"age": {"type": "integr"}}})
    with pytest.raises(InvalidRequestError, match="cannot read .*nope.json"):
        load_schema(str(tmp_path / "nope.json"))
    with pytest.raises(InvalidRequestError, match="has no attribute 'MISSING'"):
        load_schema("tests.unit.test_extract:MISSING")


def test_argument_errors_come_before_any_work(tmp_path):
    docs = tmp_path / "docs.jsonl"
    write_docs(docs, 2)
    schema = write_schema(tmp_path)
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(InvalidRequestError, match="give one of backend, endpoint, model_path"):
        extract(schema, str(docs), out, endpoint="http://127.0.0.1:1", model_path="/x")
    with pytest.raises(InvalidRequestError, match=r"engine options \(dtype\) apply to an engine this call builds"):
        extract(schema, str(docs), out, endpoint="http://127.0.0.1:1", engine_args={"dtype": "float32"})
    with pytest.raises(InvalidRequestError, match="an instruction or a prompt file, not both"):
        extract(schema, str(docs), out, instruction="a", prompt_file="b")
    assert not os.path.exists(out)


# ---- jobs on the default model ------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "braid.cli", "extract", "--no-progress", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["bad schema", "missing text field", "unreadable input", "missing folder"])
def test_cli_fails_before_any_work_with_a_clear_message(tmp_path, case):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out.jsonl"
    write_docs(docs, 3)
    schema = write_schema(tmp_path)
    if case == "bad schema":
        schema = write_schema(tmp_path, {"type": "object", "properties": {"a": {"type": "strng"}}})
        expected = "schema: not a valid JSON schema at properties/a/type"
    elif case == "missing text field":
        docs.write_text('{"id": 1, "body": "x"}\n')
        expected = r"line 1 \(id 1\) has no 'text' field"
    elif case == "unreadable input":
        docs = tmp_path / "absent.jsonl"
        expected = "cannot read .*absent.jsonl"
    else:
        out = tmp_path / "no" / "out.jsonl"
        expected = "the folder .*/no does not exist"
    started = time.perf_counter()
    result = run_cli("--schema", schema, "--input", str(docs), "--output", str(out))
    assert result.returncode == 2, result.stderr
    assert re.search(expected, result.stderr), result.stderr
    assert not out.exists()
    assert time.perf_counter() - started < 30  # no model was loaded


@pytest.mark.slow
def test_a_schema_the_backend_cannot_compile_fails_before_any_document(tmp_path, smollm2_hf_dir):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out.jsonl"
    write_docs(docs, 3)
    remote = {"type": "object", "properties": {"a": {"$ref": "https://example.invalid/a.json"}}}
    with pytest.raises(InvalidRequestError, match="schema: the backend cannot use it: .*example.invalid"):
        extract(remote, str(docs), str(out), model_path=smollm2_hf_dir, progress=False)
    assert not out.exists()


@pytest.mark.slow
def test_200_documents_give_200_records_each_valid_or_a_named_error(tmp_path, smollm2_hf_dir):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out.jsonl"
    ids = write_docs(docs, 200)
    summary = extract(SCHEMA, str(docs), str(out), model_path=smollm2_hf_dir, max_new_tokens=48, progress=False)
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(ids)
    assert summary.processed == 200 and summary.ok + summary.errors == 200
    import jsonschema

    for r in records:
        if "data" in r:
            jsonschema.validate(r["data"], SCHEMA)
        else:
            assert r["error"].startswith(("cut off by max_new_tokens", "invalid:", "failed:")), r
    assert summary.ok >= 190, summary.format()  # the model reads these sentences
    assert summary.cache_hit_rate > 0.5, summary.format()  # instruction + schema computed once
    again = extract(SCHEMA, str(docs), str(out), model_path=smollm2_hf_dir, progress=False)
    assert again.skipped == 200 and again.processed == 0  # resumes: nothing left, no model loaded


@pytest.mark.slow
def test_retry_errors_redoes_only_the_error_records(tmp_path, smollm2_hf_dir):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out.jsonl"
    ids = write_docs(docs, 6)
    first = extract(SCHEMA, str(docs), str(out), model_path=smollm2_hf_dir, max_new_tokens=4, progress=False,
                    limit=4)
    assert first.errors == 4 and first.error_kinds == {"cut off": 4}
    assert all(r["error"].startswith("cut off by max_new_tokens (4)") for r in read_records(out))
    second = extract(SCHEMA, str(docs), str(out), model_path=smollm2_hf_dir, max_new_tokens=48, progress=False,
                     retry_errors=True)
    assert second.skipped == 0 and second.processed == 6
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(ids) and all("data" in r for r in records)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_writes_every_id_exactly_once(tmp_path, smollm2_hf_dir):
    docs, out = tmp_path / "docs.jsonl", tmp_path / "out.jsonl"
    ids = write_docs(docs, 120)
    # a small window: records arrive a few at a time, so the kill lands mid-run
    args = ["--schema", write_schema(tmp_path), "--input", str(docs), "--output", str(out), "--model-path",
            smollm2_hf_dir, "--max-new-tokens", "48", "--window", "4"]
    proc = subprocess.Popen([sys.executable, "-m", "braid.cli", "extract", "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = out.read_bytes().count(b"\n")
    assert 10 <= done_before < 120
    with open(out, "ab") as f:  # as if the kill had cut a line in half
        f.write(b'{"id": "doc-119", "da')
    result = run_cli(*args, "--window", "64")  # the window is not part of the guarantee
    assert result.returncode == 0, result.stderr
    assert f"{done_before} already in" in result.stdout and "repaired" in result.stdout
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(ids)  # every id, exactly once
