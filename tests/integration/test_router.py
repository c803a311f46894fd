"""``braid serve`` replicas behind the SGLang router (``smg launch``), and ``braid serve --dp``.

Two replicas of the default model behind a router on loopback: chat, /generate and json_schema
through the router; a repeated prompt stays on the replica that caches it; the language's
RuntimeEndpoint through the router; a killed replica does not fail requests. Then the
``--dp`` launcher (on the tiny test model): ready, API key enforced, and everything stops when a
child dies or on Ctrl-C. Needs the ``smg`` package (the test extra); skipped only without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from braid.net import free_port
from braid.server.dp import router_command
from tests.integration.conftest import API_KEY, Server, start_server, stop_server

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(router_command() is None, reason="the SGLang router is not installed "
                                                                  "(pip install smg, or braid's test extra)")]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
LONG_PROMPT = "Here is a long shared preamble about routing requests to the right replica. " * 8


class Router:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc, self.url = proc, url


def start_router(urls: list[str]) -> Router:
    port = free_port()
    cmd = [*router_command(), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
           "--policy", "cache_aware", "--api-key", API_KEY, "--prometheus-host", "127.0.0.1",
           "--prometheus-port", str(free_port()), "--shutdown-grace-period-secs", "1", "--log-level", "warn",
           "--health-check-interval-secs", "1", "--health-failure-threshold", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    router = Router(proc, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{router.url}/v1/models", headers=HEADERS, timeout=2).json().get("data"):
                return router
        except (httpx.HTTPError, ValueError):
            pass
        assert proc.poll() is None, f"smg exited with status {proc.returncode}"
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("smg did not register its workers in 30 s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def replicas(smollm2_hf_dir):
    with ThreadPoolExecutor(2) as pool:  # they load side by side
        servers = list(pool.map(lambda _: start_server(smollm2_hf_dir), range(2)))
    yield servers
    for srv in servers:
        stop_server(srv)


@pytest.fixture(scope="module")
def router(replicas):
    r = start_router([s.url for s in replicas])
    yield r
    stop(r.proc)


@pytest.fixture(scope="module")
def client(router):
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def prompt_tokens(server: Server) -> float:
    return server.stats()["braid_prompt_tokens_total"]


def test_chat_generate_and_json_schema_through_the_router(router, client, model):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True) if c.choices)
    assert text
    one = httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60,
                     json={"text": "The capital of France is", "sampling_params": {"max_new_tokens": 4}}).json()
    assert one["meta_info"]["completion_tokens"] == 4
    many = httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60,
                      json={"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 2}}).json()
    assert [m["meta_info"]["completion_tokens"] for m in many] == [2, 2]
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "A city as JSON"}], max_tokens=30,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    bad = httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60, json={"text": "x", "nonsense": 1})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "nonsense"  # through the router, too


def test_a_repeated_prompt_lands_on_the_same_replica(router, replicas):
    before = [prompt_tokens(s) for s in replicas]
    metas = []
    for _ in range(4):
        r = httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60,
                       json={"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 2}})
        metas.append(r.json()["meta_info"])
    grown = [prompt_tokens(s) - b for s, b in zip(replicas, before)]
    assert sorted(g > 0 for g in grown) == [False, True], grown  # one replica saw all four
    assert all(m["cached_tokens"] >= m["prompt_tokens"] - 1 for m in metas[1:]), metas


def test_the_language_runs_through_the_router(router):
    import braid as bd

    @bd.program
    def story(s):
        s += "Once upon a time" + bd.gen("start", max_tokens=4, temperature=0)
        forks = s.fork(3)
        forks += ", then" + bd.gen("next", max_tokens=3, temperature=0)
        s["nexts"] = [f["next"] for f in forks]

    state = story.run(backend=bd.RuntimeEndpoint(router.url, api_key=API_KEY))
    assert len(state["nexts"]) == 3 and len(set(state["nexts"])) == 1  # greedy: one continuation


def test_flush_cache_reaches_every_replica(router, replicas):
    r = httpx.post(f"{router.url}/flush_cache", headers=HEADERS, timeout=30)
    assert r.status_code == 200 and r.json()["workers_flushed"] == 2, r.text
    assert all(s.stats()["braid_kv_cached_slots"] == 0 for s in replicas)


def test_requests_still_succeed_after_a_replica_dies(router, replicas, client, model):
    # last of the fleet's tests: it kills the replica that holds LONG_PROMPT, where the router sends it
    before = [prompt_tokens(s) for s in replicas]
    body = {"text": LONG_PROMPT, "sampling_params": {"max_new_tokens": 1}}
    assert httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60, json=body).status_code == 200
    holder = next(s for s, b in zip(replicas, before) if prompt_tokens(s) > b)
    holder.proc.kill()
    holder.proc.wait()
    out = httpx.post(f"{router.url}/generate", headers=HEADERS, timeout=60, json=body)  # retried elsewhere
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 1, out.text
    for i in range(2):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"{i}"}], max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")


# ---- braid serve --dp --------------------------------------------------------------------------
class Launcher:
    def __init__(self, model_dir: str, dp: int) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "braid.cli", "serve", "--dp", str(dp), "--model-path", model_dir,
               "--port", str(self.port), "--api-key", API_KEY, "--cpu-threads", "1", "--max-total-tokens", "4096"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url = f"http://127.0.0.1:{self.port}"
        self.lines: list[str] = []
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self) -> list[int]:
        """The replicas' pids, once the launcher says it is ready."""
        if not self.ready.wait(90):
            raise RuntimeError("braid serve --dp did not start:\n" + "".join(self.lines))
        return [int(m.group(1)) for line in self.lines if (m := re.search(r"\(pid (\d+)\)", line))]

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("braid serve: ready at"):
                self.ready.set()

    def children(self) -> list[int]:
        """Pids whose parent is the launcher (read from /proc)."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = open(f"/proc/{entry}/stat").read()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    pids.append(int(entry))
        return pids

    def port_closed(self) -> bool:
        try:
            httpx.get(f"{self.url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dp_launcher_serves_then_stops_everything_when_a_replica_dies(chat_model_dir):
    launcher = Launcher(chat_model_dir, dp=1)  # dp=2 below, in the Ctrl-C test (cheaper there: nothing loads)
    try:
        pids = launcher.wait_ready()
        assert len(pids) == 1
        body = {"text": "The quick", "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(f"{launcher.url}/generate", json=body, timeout=30).status_code == 401  # the router checks
        r = httpx.post(f"{launcher.url}/generate", json=body, headers=HEADERS, timeout=30)
        assert r.status_code == 200 and r.json()["meta_info"]["completion_tokens"] == 2
        os.kill(pids[0], signal.SIGKILL)
        assert launcher.proc.wait(timeout=30) == 1
        assert "replica 0 exited" in "".join(launcher.lines)
        assert launcher.port_closed()  # the router is gone too
    finally:
        launcher.kill()


def test_dp_launcher_stops_its_replicas_on_ctrl_c(chat_model_dir):
    launcher = Launcher(chat_model_dir, dp=2)
    try:
        deadline = time.monotonic() + 20
        while len(pids := launcher.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(pids) == 2
        time.sleep(1.0)  # loading, not ready: Ctrl-C must not leave them behind
        launcher.proc.send_signal(signal.SIGINT)
        assert launcher.proc.wait(timeout=30) == 0
        assert not any(_pid_alive(p) for p in pids)
    finally:
        launcher.kill()
