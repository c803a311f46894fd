"""``braid serve --dp N``: N ``braid serve`` replicas on loopback ports, and the SGLang router
(``smg launch``, from the ``smg`` package) in front of them on the requested host and port.

A thin launcher, not a router: it starts the replicas (each with the same engine flags, its own
free port), waits until every one is ready, starts the router with ``--worker-urls``, and then
watches. Whichever child exits first, or Ctrl-C / SIGTERM, stops them all: router first (no new
requests), then the replicas, each given a grace period before it is killed. With an API key,
the replicas require it and the router both requires it from clients and sends it to the
replicas (smg's ``--api-key``). On a machine with enough GPUs, replica i gets its own
(``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx

from braid.config import EngineConfig, ServerConfig
from braid.errors import InvalidRequestError, MissingPackageError, RequestFailedError
from braid.net import free_port

READY = re.compile(r"braid serve: ready at (http://\S+)")
STOP_GRACE_S = 15.0  # per child, after SIGTERM, before SIGKILL


@dataclass(frozen=True)
class DPConfig:
    dp: int  # replicas
    router_policy: str = "cache_aware"  # smg --policy
    router_metrics_port: int | None = None  # smg's Prometheus port (bound to 127.0.0.1); None = a free one
    router_args: str = ""  # more smg launch flags, as one shell-quoted string
    startup_timeout: float = 1800.0  # seconds for a replica to load and warm up


def router_command() -> list[str] | None:
    """How to run ``smg launch`` here, or None when the smg package is not installed."""
    exe = shutil.which("smg")
    if exe:
        return [exe, "launch"]
    if importlib.util.find_spec("smg") is not None:
        return [sys.executable, "-m", "smg", "launch"]
    return None


def replica_args(engine: EngineConfig, server: ServerConfig) -> list[str]:
    """``braid serve`` flags that rebuild ``engine`` (only the fields off their defaults), on a
    loopback port of the replica's own choosing."""
    args = ["--host", "127.0.0.1", "--port", "0"]
    for f in dataclasses.fields(engine):
        value = getattr(engine, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    if server.api_key:
        args += ["--api-key", server.api_key]
    if server.served_model_name:
        args += ["--served-model-name", server.served_model_name]
    return args


class _Child:
    """One child process whose output is copied, prefixed, to ours; ``url`` once it is ready."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                     start_new_session=True)  # Ctrl-C reaches us only: we stop them in order
        self.url: str | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            m = READY.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self.ready.set()
            sys.stdout.write(f"[{self.name}] {line}")
            sys.stdout.flush()
        self.ready.set()  # exited: whoever waits looks at the process

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait_stopped(self, deadline: float) -> None:
        try:
            self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _gpu_groups(dp: int, per_replica: int) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES per replica when this machine has dp * per_replica GPUs; else None."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d for d in visible.split(",") if d.strip()]
    elif not os.path.exists("/dev/nvidiactl"):  # no NVIDIA driver: skip importing torch just to count zero
        ids = []
    else:
        try:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        except ImportError:
            ids = []
    if len(ids) < dp * per_replica or not ids:
        return None
    return [",".join(ids[i * per_replica:(i + 1) * per_replica]) for i in range(dp)]


def serve_dp(engine: EngineConfig, server: ServerConfig, dp: DPConfig) -> int:
    """Run replicas + router until one exits or we are interrupted; the exit status (blocks)."""
    router = router_command()
    if router is None:
        raise MissingPackageError("braid serve --dp (the SGLang router, package smg)", "pip install 'braid[router]'")
    if server.port == 0:
        raise InvalidRequestError("port", "braid serve --dp needs a fixed port for the router, got 0")
    stopping = threading.Event()
    children: list[_Child] = []

    def on_signal(signum, frame) -> None:
        stopping.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        gpus = _gpu_groups(dp.dp, getattr(engine, "tp_size", 1)) if engine.device in ("auto", "cuda") else None
        cmd = [sys.executable, "-m", "braid.cli", "serve", *replica_args(engine, server)]
        for i in range(dp.dp):
            env = {"CUDA_VISIBLE_DEVICES": gpus[i]} if gpus else None
            children.append(_Child(f"replica {i}", cmd, env))
        urls = _wait_ready(children, dp.startup_timeout, stopping)
        if urls is None:
            return 1 if not stopping.is_set() else 0
        for child in children:
            print(f"braid serve --dp: replica {child.name.split()[-1]} (pid {child.proc.pid}) at {child.url}",
                  flush=True)
        metrics_port = dp.router_metrics_port or free_port()
        router_cmd = [*router, "--host", server.host, "--port", str(server.port), "--worker-urls", *urls,
                      "--policy", dp.router_policy, "--prometheus-host", "127.0.0.1",
                      "--prometheus-port", str(metrics_port), "--shutdown-grace-period-secs", "5",
                      "--log-level", "warn", *(["--api-key", server.api_key] if server.api_key else []),
                      *shlex.split(dp.router_args)]  # fmt: skip
        children.append(_Child("router", router_cmd))
        url = f"http://{_host_for_url(server.host)}:{server.port}"
        if not _wait_router(children[-1], url, len(urls), server.api_key, stopping):
            return 1 if not stopping.is_set() else 0
        print(f"braid serve: ready at {url} (router over {dp.dp} replicas; router metrics on "
              f"127.0.0.1:{metrics_port})", flush=True)
        while not stopping.is_set():
            gone = next((c for c in children if c.proc.poll() is not None), None)
            if gone is not None:
                print(f"braid serve --dp: {gone.name} exited with status {gone.proc.returncode}; stopping all",
                      file=sys.stderr, flush=True)
                return 1
            stopping.wait(0.5)
        return 0
    finally:
        _stop_all(children)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _host_for_url(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _wait_ready(children: list[_Child], timeout: float, stopping: threading.Event) -> list[str] | None:
    deadline = time.monotonic() + timeout
    for child in children:
        while not child.ready.wait(0.2):
            if stopping.is_set():
                return None
            if time.monotonic() > deadline:
                raise RequestFailedError(f"braid serve --dp: {child.name} was not ready after {timeout:.0f} s")
        if child.url is None:
            print(f"braid serve --dp: {child.name} exited with status {child.proc.wait()} before it was ready; "
                  "stopping all", file=sys.stderr, flush=True)
            return None
    return [c.url for c in children]


def _wait_router(router: _Child, url: str, workers: int, api_key: str | None, stopping: threading.Event,
                 timeout: float = 120.0) -> bool:
    """Until the router answers and lists a model (its workers are registered)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping.is_set():
        if router.proc.poll() is not None:
            print(f"braid serve --dp: the router exited with status {router.proc.returncode}; stopping all",
                  file=sys.stderr, flush=True)
            return False
        try:
            r = httpx.get(f"{url}/v1/models", headers=headers, timeout=2)
            if r.status_code == 200 and r.json().get("data"):
                return True
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.3)
    if not stopping.is_set():
        print(f"braid serve --dp: the router at {url} did not register its {workers} workers in {timeout:.0f} s",
              file=sys.stderr, flush=True)
    return False


def _stop_all(children: list[_Child]) -> None:
    """Router first (it stops taking requests), then the replicas; each killed after a grace period."""
    for group in ([c for c in children if c.name == "router"], [c for c in children if c.name != "router"]):
        for child in group:
            child.stop()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in group:
            child.wait_stopped(deadline)
