"""What the SGLang router (``smg``) adds per request: two replicas of the default model started by
``braid serve --dp 2``, each measured directly and through the router in front of them.

    BRAID_CACHE=/tmp/braidcache python -m benchmarks.router_overhead [--requests 50] \\
        [--clients 16] [--concurrent-requests 200] [--rounds 2] [--cpu-threads 1] [--dry-run]

The launcher runs as a child process exactly as a user would start it (router policy
``cache_aware``, metrics on 127.0.0.1, 5 s shutdown grace); the replica URLs are read from its
output. After a warm-up, three measurements, each of which alternates the direct and the router
path so that load from other jobs on the machine falls on both alike:

- latency of N sequential ``/generate`` requests with ``max_new_tokens=1`` (one fixed prompt),
  direct to replica 0 vs through the router;
- the same for ``/v1/chat/completions`` with ``max_tokens=1``;
- throughput of M concurrent clients (a thread pool, one keep-alive httpx client per thread)
  sending R ``/generate`` requests, each with its own prompt: direct (the client alternates the
  two replicas) vs through the router; ``--rounds`` runs per path in the order direct, router,
  router, direct, ..., each after M warm-up requests; req/s = all requests / all run time.

Prints p50 / p90 latency and requests/s per path, the router's overhead (router minus direct),
and the load average before and after (the numbers mean little on a busy machine). ``--dry-run``
uses N=5 and R=20. Every child stops on exit, Ctrl-C or error: SIGTERM to the launcher (which stops
router, then replicas), then SIGKILL for anything of ours still alive after a grace period.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from braid.net import free_port
from braid.server.dp import router_command

REPLICA = re.compile(r"^braid serve --dp: replica (\d+) \(pid (\d+)\) at (http://\S+)")
ROUTER_READY = re.compile(r"^braid serve: ready at (http://\S+) \(router over")
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Say hi."}]
STOP_GRACE_S = 45.0  # the launcher gives the router, then the replicas, up to 15 s each


class Launcher:
    """``braid serve --dp 2`` as a child process; its output kept (last lines) and parsed."""

    def __init__(self, dp: int, cpu_threads: int, policy: str, verbose: bool) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "braid.cli", "serve", "--dp", str(dp), "--host", "127.0.0.1",
               "--port", str(self.port), "--cpu-threads", str(cpu_threads), "--router-policy", policy]
        self.cmd, self.dp, self.verbose = cmd, dp, verbose
        self.replicas: dict[int, str] = {}
        self.replica_pids: set[int] = set()
        self.router_url: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        self.ready = threading.Event()
        # Its own session: Ctrl-C reaches this script only, which then stops the launcher in order.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self.descendants: set[int] = set()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line)
            if self.verbose:
                sys.stderr.write(line)
            m = REPLICA.match(line)
            if m:
                self.replicas[int(m.group(1))] = m.group(3)
                self.replica_pids.add(int(m.group(2)))
            m = ROUTER_READY.match(line)
            if m:
                self.router_url = m.group(1)
                self.ready.set()
        self.ready.set()  # exited

    def wait_ready(self, timeout: float) -> None:
        if not self.ready.wait(timeout) or self.router_url is None or len(self.replicas) < self.dp:
            raise RuntimeError(f"`{' '.join(self.cmd)}` was not ready in {timeout:.0f} s "
                               f"(status {self.proc.poll()}); its last output:\n" + "".join(self.tail))
        self.descendants = _descendants(self.proc.pid)  # router + replicas, for the last-resort kill

    def stop(self) -> None:
        pids = self.descendants | _descendants(self.proc.pid) | self.replica_pids
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        deadline = time.monotonic() + 5
        left = {p for p in pids if _alive(p)}
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = {p for p in left if _alive(p)}
        for pid in left:  # the launcher could not stop them: ours, so kill them by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (from /proc; Linux)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])  # field 4: ppid
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation), of latencies in seconds, in ms."""
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return (xs[lo] + (xs[hi] - xs[lo]) * (k - lo)) * 1000


def generate_body(prompt: str) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}


def chat_body(model: str) -> dict:
    return {"model": model, "messages": CHAT, "max_tokens": 1, "temperature": 0.0}


def timed_post(client: httpx.Client, url: str, body: dict) -> float:
    start = time.perf_counter()
    r = client.post(url, json=body)
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed


def sequential(client: httpx.Client, direct: str, router: str, route: str, body: dict, n: int):
    """n requests per path, one at a time, alternating direct / router (order swapped each round)."""
    lat = {"direct": [], "router": []}
    for i in range(n):
        pair = [("direct", direct), ("router", router)]
        for name, base in pair if i % 2 == 0 else pair[::-1]:
            lat[name].append(timed_post(client, base + route, body))
    return lat


def concurrent(urls: list[str], clients: int, total: int,
               replicas: list[str]) -> tuple[list[float], float, list[int]]:
    """``total`` /generate requests from ``clients`` threads; request i goes to urls[i % len(urls)].
    Latencies (s), wall time (s), and how many requests each replica served (after the warm-up)."""
    local = threading.local()
    made: list[httpx.Client] = []
    lock = threading.Lock()

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
            with lock:
                made.append(local.client)
        body = generate_body(f"Request number {i}. {PROMPT}")
        return timed_post(local.client, urls[i % len(urls)] + "/generate", body)

    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, range(clients)))  # warm up: connections open, threads started
            before = served_counts(replicas)
            start = time.perf_counter()
            lat = list(pool.map(one, range(total)))
            wall = time.perf_counter() - start
            served = [int(b - a) for a, b in zip(before, served_counts(replicas))]
    finally:
        for c in made:
            c.close()
    return lat, wall, served


def served_counts(urls: list[str]) -> list[float]:
    """Each replica's finished-request count (its /metrics), to show how the router split the load."""
    out = []
    for url in urls:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        out.append(sum(float(v) for v in re.findall(r"^braid_request_latency_seconds_count(?:\{[^}]*\})? (\S+)$",
                                                    text, re.M)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=50, help="sequential requests per path and route (N)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (M)")
    ap.add_argument("--concurrent-requests", type=int, default=200, help="requests per path, concurrent run (R)")
    ap.add_argument("--rounds", type=int, default=2, help="concurrent runs per path, in ABBA order")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up requests per endpoint and route")
    ap.add_argument("--cpu-threads", type=int, default=1, help="braid serve --cpu-threads per replica")
    ap.add_argument("--router-policy", default="cache_aware", help="braid serve --router-policy")
    ap.add_argument("--dry-run", action="store_true", help="N=5, R=20: a quick check that it all works")
    ap.add_argument("-v", "--verbose", action="store_true", help="copy the launcher's output to stderr")
    args = ap.parse_args()
    if args.dry_run:
        args.requests, args.concurrent_requests, args.warmup = 5, 20, 2
    if router_command() is None:
        print("the SGLang router is not installed: pip install 'braid[router]'", file=sys.stderr)
        return 1

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    load_before = loadavg()
    t0 = time.monotonic()
    launcher = None
    try:
        launcher = Launcher(2, args.cpu_threads, args.router_policy, args.verbose)
        launcher.wait_ready(600)
        router = launcher.router_url
        replicas = [launcher.replicas[i] for i in sorted(launcher.replicas)]
        print(f"launcher: {' '.join(launcher.cmd[1:])}  (ready in {time.monotonic() - t0:.1f} s)")
        print(f"replicas: {', '.join(replicas)}; router: {router}")
        with httpx.Client(timeout=120) as client:
            model = client.get(f"{replicas[0]}/v1/models").json()["data"][0]["id"]
            for base in [*replicas, router]:  # warm-up: every endpoint, both routes
                for _ in range(args.warmup):
                    timed_post(client, base + "/generate", generate_body(PROMPT))
                    timed_post(client, base + "/v1/chat/completions", chat_body(model))
            rows = {}
            for route, body, label in (("/generate", generate_body(PROMPT), "/generate"),
                                       ("/v1/chat/completions", chat_body(model), "chat")):
                lat = sequential(client, replicas[0], router, route, body, args.requests)
                for path in ("direct", "router"):
                    xs = lat[path]
                    rows[(label, path)] = (pct(xs, 50), pct(xs, 90), len(xs) / sum(xs))
        conc = {"direct": ([], [], [0, 0]), "router": ([], [], [0, 0])}  # latencies, walls, split
        order = ["direct", "router"]
        for r in range(args.rounds):  # direct, router, router, direct, ...: neither always goes first
            for path in order if r % 2 == 0 else order[::-1]:
                lat, wall, split = concurrent(replicas if path == "direct" else [router], args.clients,
                                              args.concurrent_requests, replicas)
                conc[path][0].extend(lat)
                conc[path][1].append(wall)
                conc[path][2][:] = [a + b for a, b in zip(conc[path][2], split)]
        for path, (lat, walls, _) in conc.items():
            rows[(f"{args.clients} clients", path)] = (pct(lat, 50), pct(lat, 90), len(lat) / sum(walls))
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        return 130
    finally:
        if launcher is not None:
            launcher.stop()
    load_after = loadavg()

    print(f"\nsequential: N={args.requests} per path (alternating), max_new_tokens / max_tokens = 1; "
          f"concurrent: {args.clients} clients, R={args.concurrent_requests} /generate per path; "
          f"router policy {args.router_policy}; replicas --cpu-threads {args.cpu_threads}; "
          f"{args.rounds} concurrent round(s) per path; {os.cpu_count()} CPUs")
    print(f"requests per replica in the concurrent run: router {conc['router'][2]}, direct {conc['direct'][2]}; "
          "sequential req/s = 1 / mean latency")
    print("\n| workload | path | p50 ms | p90 ms | req/s |")
    print("|---|---|---:|---:|---:|")
    for (label, path), (p50, p90, rps) in rows.items():
        print(f"| {label} | {path} | {p50:.1f} | {p90:.1f} | {rps:.1f} |")
    print("\n| workload | router overhead p50 ms | p90 ms | req/s |")
    print("|---|---:|---:|---:|")
    for label in dict.fromkeys(k[0] for k in rows):
        d, r = rows[(label, "direct")], rows[(label, "router")]
        print(f"| {label} | {r[0] - d[0]:+.1f} | {r[1] - d[1]:+.1f} | {r[2] - d[2]:+.1f} "
              f"({(r[2] / d[2] - 1) * 100:+.0f}%) |")
    print(f"\nload average (1/5/15 min): before {load_before}; after {load_after}; "
          f"total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
