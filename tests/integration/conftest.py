"""A real ``braid serve`` on 127.0.0.1, started as a subprocess, for the integration tests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.engine_helpers import make_engine_model

API_KEY = "sk-braid-test"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Server:
    def __init__(self, proc: subprocess.Popen, url: str) -> None:
        self.proc = proc
        self.url = url
        self.headers = {"Authorization": f"Bearer {API_KEY}"}

    def stats(self) -> dict[str, float]:
        """The /metrics gauges and counters, by name."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers).text
        return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(braid_\w+) ([0-9.e+-]+)$", text, re.M)}

    def wait_at_rest(self, timeout: float = 20.0) -> dict[str, float]:
        """Poll until no request runs, waits or holds KV; return the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if (s["braid_running_requests"], s["braid_waiting_requests"], s["braid_kv_usage_ratio"]) == (0, 0, 0):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"not at rest after {timeout} s: {s}")
            time.sleep(0.1)


def start_server(model_path: str, *extra: str) -> Server:
    cmd = [sys.executable, "-m", "braid.cli", "serve", "--model-path", model_path, "--port", "0",
           "--api-key", API_KEY, "--cpu-threads", "1", "--max-total-tokens", "8192", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        lines.append(line)
        m = re.search(r"ready at (http://\S+)", line)
        if m:
            return Server(proc, m.group(1))
    proc.kill()
    raise RuntimeError("braid serve did not start:\n" + "".join(lines))


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama whose tokenizer has a ChatML chat template."""
    folder = make_engine_model("llama", tmp_path_factory.mktemp("served"), max_position_embeddings=4096)
    cfg_path = Path(folder) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHATML
    cfg_path.write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="session")
def server(chat_model_dir):
    srv = start_server(chat_model_dir)
    yield srv
    stop_server(srv)
