"""How many people one box serves: N concurrent clients drive the standalone service over HTTP, bounded in time.

    python scripts/capacity.py BUNDLE [--clients 4] [--seconds 60] [--workers 1] [--threads N]
                                      [--size 512] [--steps 1] [--guidance 0] [--decoder taesd] [--greedy]

Each client is a user of its own that schedules a one-image task, polls it until done, and schedules the next, until
the time is up. With ``--greedy`` one more user schedules a 12-image task first, to show what it does to the others'
latency. Prints images per hour, p50/p95 latency of the one-image tasks (schedule → done, as a client sees it), the
greedy task's latency, and the process's peak memory. A figure is only meaningful with the CPU it was measured on.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.bench.memory import peak_rss_mb, rss_mb
from backend.config import Settings
from backend.standalone.server import StandaloneServer


class Client:
    def __init__(self, url: str, user: str, secret: str) -> None:
        rest = url.split("://", 1)[1]
        self.host, self.port = rest.split("/", 1)[0].split(":")
        self.base = "/" + rest.split("/", 1)[1]
        self.auth = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()
        self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=600)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body)
        self.conn.request(method, f"{self.base}/{path}", body=data,
                          headers={"Authorization": self.auth, "Content-Type": "application/json",
                                   "OCS-APIRequest": "true"})
        reply = self.conn.getresponse()
        payload = json.loads(reply.read())
        if reply.status != 200:
            raise RuntimeError(f"{method} {path}: {reply.status} {payload['ocs']['meta']['message']}")
        return payload["ocs"]["data"]

    def run_task(self, n: int, options: dict) -> float:
        t0 = time.monotonic()
        task = self.call("POST", "schedule", {"input": "a red fox in the snow", "appId": "load", "numberOfImages": n,
                                              **options})["task"]
        while task["status"] not in (3, 4):
            time.sleep(0.05)
            task = self.call("GET", f"task/{task['id']}")["task"]
        if task["status"] == 4:
            raise RuntimeError(task.get("errorMessage"))
        self.call("DELETE", f"task/{task['id']}")
        return time.monotonic() - t0


def load_options(doc: str, clients: int) -> argparse.ArgumentParser:
    """The options both capacity scripts take (``clients``: the default number of users)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the model bundle folder to serve")
    parser.add_argument("--clients", type=int, default=clients,
                        help="users asking for one image each, again as soon as one arrives (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="how long the clients keep asking (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="generation workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per worker; 0: the service's own choice (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default: %(default)s)")
    parser.add_argument("--decoder", default="vae", choices=["vae", "taesd"],
                        help="latent decoder (default: %(default)s)")
    parser.add_argument("--greedy", action="store_true", help="one more user schedules a 12-image task first")
    return parser


def percentile(values: list[float], q: float) -> float:
    """The value below which the share ``q`` of ``values`` lies (nearest rank, as p95 of a few tasks is read)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Load:
    """What :func:`drive` saw: one-image latencies, the greedy task's latency, errors, and seconds it ran."""

    latencies: list[float] = field(default_factory=list)
    greedy: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    took: float = 0.0

    def report(self, ready: str) -> None:
        """Print images per hour and the latencies; ``ready`` opens the first line."""
        images = len(self.latencies) + (12 if self.greedy else 0)
        ordered = sorted(self.latencies)
        print(f"{ready}; {images} images in {self.took:.1f} s = {images / self.took * 3600:,.0f} images/hour")
        if ordered:
            print(f"one-image task latency: p50 {statistics.median(ordered):.2f} s, "
                  f"p95 {percentile(ordered, 0.95):.2f} s ({len(ordered)} tasks)")
        if self.greedy:
            print(f"12-image task latency: {self.greedy[0]:.1f} s")


def drive(run_task: Callable[[str, int], float], users: list[str], seconds: float, greedy: bool) -> Load:
    """Each of ``users[1:]`` runs one-image tasks (``run_task(user, n)`` → seconds) until ``seconds`` are up;
    with ``greedy``, ``users[0]`` schedules a 12-image task first."""
    load = Load()
    deadline = time.monotonic() + seconds

    def client(user: str) -> None:
        while time.monotonic() < deadline:
            try:
                load.latencies.append(run_task(user, 1))
            except Exception as exc:
                load.errors.append(str(exc))
                return

    threads = []
    if greedy:
        threads.append(threading.Thread(target=lambda: load.greedy.append(run_task(users[0], 12))))
        threads[-1].start()
        time.sleep(0.2)
    started = time.monotonic()
    for user in users[1:]:
        threads.append(threading.Thread(target=client, args=(user,)))
        threads[-1].start()
    for t in threads:
        t.join()
    load.took = time.monotonic() - started
    return load


def main() -> None:
    args = load_options(__doc__, clients=4).parse_args()
    users = {f"user{i}": f"capacity-secret-{i:04d}" for i in range(args.clients + 1)}
    with tempfile.TemporaryDirectory(prefix="t2i-capacity-") as data:
        settings = Settings.from_env(model=str(args.bundle), data_dir=Path(data), port=0, workers=args.workers,
                                     threads=args.threads, decoder=args.decoder, rate_limit=0,
                                     users=",".join(f"{u}:{s}" for u, s in users.items()))
        t_load = time.monotonic()
        server = StandaloneServer(settings)
        server.load_models()
        server.start()
        loaded = time.monotonic() - t_load
        options = {"size": f"{args.size}x{args.size}", "steps": args.steps, "guidance": args.guidance}
        clients = {user: Client(server.url, user, secret) for user, secret in users.items()}
        load = drive(lambda user, n: clients[user].run_task(n, options), list(users), args.seconds, args.greedy)
        steady = rss_mb()
        server.close()
    print(f"{args.bundle} at {args.size}², {args.steps} step(s), guidance {args.guidance:g}, {args.decoder} decoder; "
          f"{args.clients} client(s), {args.workers} worker(s), threads {args.threads or 'all'}")
    load.report(f"model ready in {loaded:.1f} s")
    print(f"memory: peak {peak_rss_mb():.0f} MB, at the end {steady:.0f} MB")
    if load.errors:
        print(f"errors: {load.errors[:3]}")


if __name__ == "__main__":
    main()
