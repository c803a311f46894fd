"""``braid serve`` end to end: the official openai client, SGLang-style /generate, streaming,
errors, auth, concurrency, disconnects and fuzzed bodies, against a real server on loopback."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import API_KEY


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(autouse=True)
def _at_rest_after(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_at_rest()


def post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=server.headers, timeout=60, **kw,
                      **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}))


# ---- service routes ----------------------------------------------------------------------------
def test_health_is_open_and_everything_else_needs_the_key(server, chat_model_dir):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(f"{server.url}/generate", json={"text": "x"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    models = httpx.get(f"{server.url}/v1/models", headers=server.headers).json()
    assert models["data"][0]["id"] == chat_model_dir.rstrip("/").split("/")[-1]


def test_metrics_expose_engine_state_and_latencies(server):
    post(server, "/generate", {"text": "The quick", "stream": True, "sampling_params": {"max_new_tokens": 3}})
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    for name in ("braid_running_requests", "braid_waiting_requests", "braid_kv_usage_ratio", "braid_cache_hit_rate",
                 "braid_prompt_tokens_total", "braid_generation_tokens_total",
                 "braid_time_to_first_token_seconds_bucket", "braid_inter_token_latency_seconds_bucket"):
        assert name in text, name


# ---- OpenAI ------------------------------------------------------------------------------------
def test_chat_completion_matches_generate_on_the_chat_prompt(server, client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Paris is"}],
                                       max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    prompt = "<|im_start|>user\nParis is<|im_end|>\n<|im_start|>assistant\n"
    native = post(server, "/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 8,
                                                                              "temperature": 0}}).json()
    assert choice.message.content == native["text"]
    assert r.usage.prompt_tokens == native["meta_info"]["prompt_tokens"]


def test_completions_batch_n_and_logprobs(client, model):
    r = client.completions.create(model=model, prompt=["The quick", "Paris is the"], max_tokens=5, n=2,
                                  logprobs=2, temperature=1.0, seed=3)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and len(lp.token_logprobs) == len(lp.tokens)
        assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_n_and_logprobs(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "café"}], max_tokens=6, n=2, seed=5,
        stream=True, logprobs=True, top_logprobs=2))
    texts: dict[int, str] = {0: "", 1: ""}
    tokens: dict[int, str] = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            for entry in (ch.logprobs.content if ch.logprobs else None) or []:
                tokens[ch.index] += entry.token
                assert len(entry.top_logprobs) == 2
    assert tokens == texts and all(texts.values())


def test_chat_logprob_bytes_are_the_tokens_bytes(client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "café 日本語"}],
                                       max_tokens=12, logprobs=True, top_logprobs=1, temperature=1.0, seed=2,
                                       extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    raw = b"".join(bytes(e.bytes) for e in entries)  # exact, where single tokens split characters
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content


def test_json_schema_response_format_gives_valid_json(client, model):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                "maximum": 9}},
              "required": ["ok", "n"], "additionalProperties": False}
    for seed in range(3):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "JSON please"}], max_tokens=30, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a code"}], max_tokens=10,
                                       extra_body={"regex": "[a-z]{3}-[0-9]{2}"})
    assert len(r.choices[0].message.content) == 6 and r.choices[0].message.content[3] == "-"


@pytest.mark.parametrize("kwargs, param", [
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": "x"}], temperature=-1), "temperature"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x"}], extra_body={"nonsense": 1}), "nonsense"),
    (dict(messages=[{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {"name": "f"}}]),
     "tools"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=2), "top_logprobs"),
    (dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(messages=[{"role": "user", "content": "x"}], n=65), "n"),
    (dict(messages=[{"role": "user", "content": "x"}], max_completion_tokens=-1), "max_tokens"),
    (dict(messages=[{"content": "x"}]), "messages[0].role"),
    (dict(messages=[{"role": "user", "content": "x"}], extra_body={"regex": "(unclosed"}), "regex"),
])  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_requests_get_400_naming_the_field(client, model, kwargs, param, stream):
    # streaming too: the request is checked before the response starts
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, max_tokens=4, stream=stream, **kwargs)
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt", [[[[1, 2], [3]]], [], [[]], ["a", 5], [1, "a"]])
def test_bad_completion_prompts_get_400(client, model, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=prompt, max_tokens=2)
    assert err.value.body["param"] == "prompt"


def test_a_batch_with_one_bad_prompt_runs_none_of_them(server, client, model):
    long = "The quick brown " * 200
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=["hi", long * 20], max_tokens=2000,
                                  extra_body={"ignore_eos": True})
    stats = server.stats()
    assert stats["braid_running_requests"] == 0 and stats["braid_waiting_requests"] == 0


def test_a_conversation_ending_with_the_assistant_gets_a_new_turn(server, client, model):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0)
    rendered = post(server, "/render_chat", {"messages": messages, "add_generation_prompt": True}).json()["text"]
    assert rendered.endswith("<|im_start|>assistant\n")
    tokens = post(server, "/tokenize", {"text": rendered}).json()["tokens"][0]
    assert r.usage.prompt_tokens == len(tokens)


def test_errors_for_unknown_routes_and_auth_schemes(server):
    r = httpx.get(f"{server.url}/v1/nothing", headers=server.headers)
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"})
    assert r.status_code == 200  # the scheme is case-insensitive


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])


# ---- native /generate --------------------------------------------------------------------------
def test_generate_single_batch_and_cumulative_stream(server):
    one = post(server, "/generate", {"text": "The quick", "sampling_params": {"max_new_tokens": 6, "temperature": 0,
                                                                              "ignore_eos": True}}).json()
    assert one["meta_info"]["completion_tokens"] == 6 and len(one["output_ids"]) == 6
    batch = post(server, "/generate", {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": {"max_new_tokens": 2},
                                       "return_logprob": True}).json()
    assert len(batch) == 2 and all(len(b["meta_info"]["output_token_logprobs"]) == 2 for b in batch)
    with httpx.stream("POST", f"{server.url}/generate", headers=server.headers, json={
            "text": "The quick", "stream": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    texts = [e["text"] for e in events]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # each event holds the text so far
    assert events[-1]["text"] == one["text"] and events[-1]["meta_info"]["finish_reason"] is not None


@pytest.mark.parametrize("body, param", [
    ({"txt": "x"}, "txt"),
    ({"text": 5}, "text"),
    ({"input_ids": [1, 10**9]}, "input_ids"),
    ({"text": "x", "sampling_params": {"max_new_tokens": "many"}}, "max_new_tokens"),
    (b"{not json", "body"),
])  # fmt: skip
def test_bad_generate_bodies_get_400(server, body, param):
    r = post(server, "/generate", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# ---- load, disconnects, fuzz --------------------------------------------------------------------
def test_200_concurrent_requests_each_answered_once(server):
    def one(i: int) -> tuple[int, str]:
        body = {"text": f"{i} The quick", "sampling_params": {"max_new_tokens": 4, "temperature": 0,
                                                               "ignore_eos": True}}
        if i % 2:
            with httpx.stream("POST", f"{server.url}/generate", headers=server.headers, timeout=120,
                              json={**body, "stream": True}) as r:
                last = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")][-1]
            return i, last["text"]
        return i, post(server, "/generate", body).json()["text"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(200)))
    assert [i for i, _ in results] == list(range(200))
    # greedy: a streamed and a plain answer to the same prompt agree
    again = dict(ThreadPoolExecutor(max_workers=8).map(one, [1, 3, 4, 6]))
    assert all(again[i] == results[i][1] for i in again)


def test_clients_that_disconnect_leave_no_kv_behind(server):
    body = {"text": "The quick brown", "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}
    long_body = {"text": "The quick brown", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}

    def stream_then_leave(_: int) -> None:
        with httpx.stream("POST", f"{server.url}/generate", headers=server.headers, json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first event

    def wait_then_leave(_: int) -> None:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{server.url}/generate", headers=server.headers, json=long_body, timeout=0.3)

    before = server.stats()["braid_generation_tokens_total"]
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(stream_then_leave, range(15)))
        list(pool.map(wait_then_leave, range(5)))
    generated = server.wait_at_rest(timeout=30)["braid_generation_tokens_total"] - before
    assert generated < (15 * 400 + 5 * 1500) / 2  # they were cut short, not run to the end


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
FIELDS = ["text", "input_ids", "sampling_params", "stream", "prompt", "messages", "max_tokens", "n", "model",
          "temperature", "logprobs", "top_logprobs", "response_format", "stop", "regex", "json_schema", "seed"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/generate", "/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=4) | JSON)
def test_fuzzed_bodies_never_get_a_5xx(server, path, body):
    if isinstance(body, dict):  # keep generations short: the point is the parsing
        if path != "/generate":
            body["max_tokens"] = 2
        elif isinstance(body.get("sampling_params", {}), dict):
            body["sampling_params"] = {**body.get("sampling_params", {}), "max_new_tokens": 2}
    r = post(server, path, json.dumps(body))
    assert r.status_code < 500, (path, body, r.text)
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_the_server_survives_a_storm_of_bad_and_good_requests(server):
    stop = threading.Event()
    errors: list[str] = []

    def bad() -> None:
        while not stop.is_set():
            r = post(server, "/v1/chat/completions", {"messages": "nope"})
            if r.status_code != 400:
                errors.append(r.text)

    t = threading.Thread(target=bad)
    t.start()
    try:
        for _ in range(5):
            r = post(server, "/generate", {"text": "ok", "sampling_params": {"max_new_tokens": 2}})
            assert r.status_code == 200
    finally:
        stop.set()
        t.join()
    assert not errors


# ---- SGLang's fields, and what a router asks of a worker -------------------------------------------
ROUTER_GENERATE_FIELDS = {  # what the SGLang router (smg 1.13) adds to every /generate body it forwards
    "model": "unknown", "return_text_in_logprobs": False, "log_metrics": True, "background": False,
    "no_logs": False, "return_bytes": False, "return_entropy": False}  # fmt: skip


def test_generate_accepts_sglang_fields_and_ignores_them(server):
    plain = {"text": "The quick", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    base = post(server, "/generate", plain).json()
    body = {**plain, **ROUTER_GENERATE_FIELDS, "rid": "r1", "priority": 3, "routing_key": "k", "image_data": None,
            "lora_path": None, "return_hidden_states": False, "return_logprob": [True], "top_logprobs_num": [1],
            "sampling_params": {**plain["sampling_params"], "spaces_between_special_tokens": True,
                                "no_stop_trim": False, "stop_regex": None, "stream_interval": 2, "custom_params": None,
                                "sampling_seed": 1, "logit_bias": {}}}  # fmt: skip
    r = post(server, "/generate", body)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == base["text"] and len(r.json()["meta_info"]["output_top_logprobs"]) == 4


@pytest.mark.parametrize("body, param", [
    ({"text": "x", "image_data": "http://img"}, "image_data"),
    ({"text": "x", "lora_path": "adapter"}, "lora_path"),
    ({"text": "x", "return_hidden_states": True}, "return_hidden_states"),
    ({"text": "x", "sampling_params": {"stop_regex": "a+"}}, "stop_regex"),
    ({"text": "x", "sampling_params": {"no_stop_trim": True}}, "no_stop_trim"),
    ({"text": ["x", "y"], "return_logprob": [True, False]}, "return_logprob"),
    ({"text": "x", "model": "unknown", "nonsense": 1}, "nonsense"),
])  # fmt: skip
def test_sglang_fields_braid_cannot_honour_are_refused_by_name(server, body, param):
    r = post(server, "/generate", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_accepts_sglang_extensions_and_refuses_what_it_cannot_do(server, client, model):
    messages = [{"role": "user", "content": "Paris is"}]
    base = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
    extras = {"rid": "a", "separate_reasoning": True, "stream_reasoning": True, "chat_template_kwargs": None,
              "return_hidden_states": False, "no_stop_trim": False, "custom_params": {"x": 1}, "priority": 1}
    r = client.chat.completions.create(model=None, messages=messages, max_completion_tokens=4, temperature=0,
                                       extra_body=extras)
    assert r.choices[0].message.content == base.choices[0].message.content
    ids = post(server, "/tokenize", {"text": "<|im_start|>user\nParis is<|im_end|>\n<|im_start|>assistant\n"}).json()
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                       extra_body={"input_ids": ids["tokens"][0]})  # rendered by the caller
    assert r.choices[0].message.content == base.choices[0].message.content
    for extra, param in (({"chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs"),
                         ({"continue_final_message": True}, "continue_final_message"),
                         ({"stop_regex": "x"}, "stop_regex")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, messages=messages, max_tokens=4, extra_body=extra)
        assert err.value.body["param"] == param


def test_server_info_load_and_model_info_for_a_router(server):
    for path in ("/server_info", "/get_server_info"):
        r = httpx.get(f"{server.url}{path}", headers=server.headers)
        info = r.json()
        assert r.status_code == 200 and info["dp_size"] == 1 and info["max_total_num_tokens"] == 8192
        assert API_KEY not in r.text and "api_key" not in info and info["api_key_required"] is True
    assert httpx.get(f"{server.url}/server_info").status_code == 401
    load = httpx.get(f"{server.url}/get_load", headers=server.headers).json()
    assert load[0]["num_running_reqs"] == 0 and load[0]["max_total_num_tokens"] == 8192
    loads = httpx.get(f"{server.url}/v1/loads", headers=server.headers).json()
    assert loads["loads"][0]["token_usage"] == 0.0
    info = httpx.get(f"{server.url}/get_model_info", headers=server.headers).json()
    assert info["has_chat_template"] is True


def test_flush_cache_empties_the_cache_and_refuses_while_requests_run(server):
    post(server, "/generate", {"text": "The quick brown fox", "sampling_params": {"max_new_tokens": 2}})
    assert server.stats()["braid_kv_cached_slots"] > 0
    r = post(server, "/flush_cache", b"")
    assert r.status_code == 200 and r.json()["flushed"] is True, r.text
    assert server.stats()["braid_kv_cached_slots"] == 0
    body = {"text": "The quick", "stream": True, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    with httpx.stream("POST", f"{server.url}/generate", headers=server.headers, json=body, timeout=60) as stream:
        lines = stream.iter_lines()  # held: a dropped iterator would close the connection (an abort)
        next(line for line in lines if line.startswith("data: {"))  # it runs now
        r = post(server, "/flush_cache", b"")
        load = httpx.get(f"{server.url}/get_load", headers=server.headers).json()[0]
    assert load["num_running_reqs"] == 1, load  # still running when flushed: the refusal is this test's point
    assert r.status_code == 409 and "running" in r.json()["error"]["message"], r.text


# ---- braid serve --dp, without starting anything (test_router.py runs it) ---------------------------
def test_dp_names_the_package_when_the_router_is_missing(monkeypatch, capsys):
    from braid import cli
    from braid.server import dp

    monkeypatch.setattr(dp, "router_command", lambda: None)
    assert cli.main(["serve", "--dp", "2"]) == 2
    assert "pip install 'braid[router]'" in capsys.readouterr().err


def test_dp_replicas_get_the_engine_flags_and_the_key():
    from braid.config import EngineConfig, ServerConfig
    from braid.server.dp import replica_args

    args = replica_args(EngineConfig(model_path="/m", disable_radix_cache=True, cpu_threads=1),
                        ServerConfig(host="0.0.0.0", port=8000, api_key="k"))
    assert args[:4] == ["--host", "127.0.0.1", "--port", "0"]  # replicas stay on loopback, any port
    assert " ".join(args[4:]) == "--model-path /m --disable-radix-cache --cpu-threads 1 --api-key k"
