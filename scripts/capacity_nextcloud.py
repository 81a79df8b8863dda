"""How many images one ExApp makes through a real Nextcloud 32.0.1 + AppAPI 32.0.0: the server of the integration
suite (tests/integration/real_nextcloud.py) on loopback, the ExApp registered with ``occ app_api:app:register``, and
users who schedule one-image ``core:text2image`` tasks through OCS as Assistant does; bounded in tasks and time.

    python scripts/capacity_nextcloud.py BUNDLE [--tasks 12] [--clients 1] [--seconds 900] [--threads 2]
                                                [--decoder taesd] [--size 512] [--steps 1] [--guidance 0]
                                                [--poll-interval 0.3] [--look-every 0.2] [--workers 1]
                                                [--in-process 3]

Each user schedules a one-image task, looks at it every ``--look-every`` seconds until Nextcloud shows it done, and
schedules the next, until ``--tasks`` tasks are done (or ``--seconds`` are up). Prints images per hour, p50/p95 from
scheduling to SUCCESSFUL, the CPU seconds PHP and the ExApp spent per task, and each task's timeline from the
ExApp's debug log: queue (scheduled → taken), the generation's parts, the check before the upload, the journal, the
upload and result calls, and the user's last look. Nextcloud 32 never triggers an ExApp, so an idle ExApp finds a
new task by polling every ``--poll-interval`` seconds (``T2I_POLL_INTERVAL``; 5 s unless set). Then, for comparison
on a machine whose load may change, the same image service times ``--in-process`` images in this process, without
Nextcloud (the server is stopped by then).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the real server's helpers live with the tests
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from capacity import percentile  # noqa: E402  (these folders are on sys.path when run as a script)
from capacity_exapp import task_parts  # noqa: E402
from fake_appapi import APP_ID, ExAppProcess, free_port  # noqa: E402
from real_nextcloud import (  # noqa: E402
    FAST,
    heartbeat,
    start_server,
    stop_server,
    wait_for,
    why_skipped,
)

PROMPT = "a red fox in the snow"
PASSWORD = "Capacity-User-Pass-1"
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "


@dataclass
class Task:
    id: int
    user: str
    scheduled: float  # wall-clock seconds, as the ExApp's log timestamps
    seen_done: float = 0.0
    status: str = ""


def stamp(text: str) -> float:
    """A log line's ``asctime`` (local time, milliseconds) as wall-clock seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def exapp_timeline(log: str) -> dict[int, dict[str, float]]:
    """Per task id, from the ExApp's log: when it was taken, generated and delivered (wall clock), the parts of its
    time (:data:`capacity_exapp.PARTS`), and the upload and result calls (seconds)."""
    found = task_parts(log)
    for key, pattern in (("taken", r".*: task (\d+) taken"), ("generated", r".*: task (\d+) generated"),
                         ("delivered", r".*task (\d+): \d+ image\(s\) delivered")):
        for m in re.finditer(_STAMP + pattern, log, re.MULTILINE):
            found.setdefault(int(m[2]), {})[key] = stamp(m[1])
    return found


def cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes of process group ``pgid`` (PHP's server and its workers)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(stat)
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += _cpu(fields)
    return total


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    return _cpu(_stat_fields(Path(f"/proc/{pid}/stat")))


def _stat_fields(stat: Path) -> list[str]:
    """The fields of a /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)


def in_process(bundle: Path, args: argparse.Namespace) -> list[float]:
    """Seconds per image (prompt → PNG) of the ExApp's image service in this process, without Nextcloud: the same
    bundle, threads, decoder and request, run ``args.in_process`` times after one warm-up."""
    from backend.config import Settings
    from backend.tasks.service import ImageService
    from runtime.request import GenerationRequest

    service = ImageService(Settings.from_env(model=str(bundle), threads=args.threads, decoder=args.decoder))
    service.load()
    took = []
    for seed in range(args.in_process + 1):
        t0 = time.perf_counter()
        service.run(GenerationRequest(prompt=PROMPT, width=args.size, height=args.size, steps=args.steps,
                                      guidance=args.guidance, seed=seed))
        took.append(time.perf_counter() - t0)
    return took[1:]


def admin_defaults(nc: Any, proc: Any, bundle: Path, args: argparse.Namespace) -> bool:
    """Save the measured size, steps and guidance as the model's defaults on the settings page, as an admin serving
    this shape does; where that changes the shape of the bundle's own defaults, wait until the ExApp has it ready
    (compiled, where OpenVINO compiles per shape) before the first task. True when it waited."""
    from backend.nextcloud.admin_settings import model_key
    from runtime.bundle import Bundle
    from runtime.pipeline import own_defaults

    key = model_key(str(bundle))
    for field, value in ((f"{key}_size", f"{args.size}x{args.size}"), (f"{key}_steps", str(args.steps)),
                         (f"{key}_guidance", f"{args.guidance:g}")):
        status, answer = nc.page_save(field, value)
        if status != 200:
            sys.exit(f"the settings page refused {field}={value}: {status} {answer}")
    own = own_defaults(Bundle.open(bundle))
    same = (own.width, own.height, (own.guidance or 0) > 1) == (args.size, args.size, args.guidance > 1)
    if not same:
        wait_for(lambda: "is ready at its new default size and guidance" in proc.output(), 600, proc)
    return not same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the model bundle folder to serve (its folder name names the "
                                                  "provider)")
    parser.add_argument("--tasks", type=int, default=12, help="one-image tasks in all (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=1, help="users scheduling at once (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=900.0,
                        help="the most the tasks may take, in all (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="generation workers (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="T2I_THREADS (default: %(default)s)")
    parser.add_argument("--decoder", default="taesd", choices=["vae", "taesd"],
                        help="latent decoder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=1, help="denoising steps (default: %(default)s)")
    parser.add_argument("--guidance", type=float, default=0.0, help="guidance scale (default: %(default)s)")
    parser.add_argument("--poll-interval", type=float, default=0.3,
                        help="the ExApp's T2I_POLL_INTERVAL (default: %(default)s)")
    parser.add_argument("--look-every", type=float, default=0.2,
                        help="how often a user asks for the state of a task (default: %(default)s)")
    parser.add_argument("--in-process", type=int, default=3,
                        help="then time this many images of the same service in this process, without Nextcloud "
                             "(default: %(default)s; 0: none)")
    args = parser.parse_args()
    if why_skipped():
        sys.exit(why_skipped())
    if not 1 <= args.tasks <= 1000 or not 1 <= args.clients <= 16 or not 0 < args.seconds <= 7200:
        sys.exit(f"--tasks {args.tasks}, --clients {args.clients}, --seconds {args.seconds:g}: allowed are 1-1000 "
                 "tasks, 1-16 clients and up to 7200 seconds")

    bundle = args.bundle.resolve()
    with tempfile.TemporaryDirectory(prefix="t2i-capacity-nc-") as tmp:
        root = Path(tmp)
        t_server = time.monotonic()
        nc = start_server(root / "server", free_port())
        proc = None
        try:
            server_ready = time.monotonic() - t_server
            users = [f"user{i}" for i in range(1, args.clients + 1)]
            for user in users:
                nc.add_user(user, PASSWORD)
            env = {**FAST, "T2I_MODEL": str(bundle), "T2I_DECODER": args.decoder, "T2I_THREADS": str(args.threads),
                   "T2I_POLL_INTERVAL": f"{args.poll_interval:g}", "T2I_SETTINGS_POLL": "10"}
            proc = ExAppProcess(nc, root / "storage", env, args=("--workers", str(args.workers)),  # type: ignore[arg-type]
                                verbose=2)
            t_load = time.monotonic()
            proc.start()
            heartbeat(proc, 600)
            nc.register(proc)
            provider = f"{APP_ID}:{bundle.name}"
            wait_for(lambda: provider in nc.providers(), 1800, proc)

            def offered() -> bool:  # as Assistant finds it: Nextcloud's caches may lag behind the registration
                answer = nc.ocs("GET", "/ocs/v2.php/taskprocessing/tasktypes", user=users[0], password=PASSWORD)[1]
                return "core:text2image" in ((answer or {}).get("ocs", {}).get("data") or {}).get("types", {})

            wait_for(offered, 120, proc)
            prepared = admin_defaults(nc, proc, bundle, args)
            loaded = time.monotonic() - t_load
            task_input = {"input": PROMPT, "numberOfImages": 1, "size": f"{args.size}x{args.size}",
                          "steps": args.steps, "guidance": args.guidance}
            tasks: list[Task] = []
            errors: list[str] = []
            lock = threading.Lock()
            deadline = time.monotonic() + args.seconds
            php_pgid = int((root / "server" / "run" / "php.pid").read_text())
            assert proc.proc is not None
            cpu0 = cpu_seconds(php_pgid), process_cpu(proc.proc.pid)

            def client(user: str) -> None:
                while time.monotonic() < deadline:
                    with lock:
                        if len(tasks) >= args.tasks:
                            return
                        task = Task(0, user, time.time())
                        tasks.append(task)
                    try:
                        task.id = nc.schedule(task_input, user=user, password=PASSWORD)
                        done = nc.wait([task.id], timeout=max(1.0, deadline - time.monotonic()), user=user,
                                       password=PASSWORD, interval=args.look_every)[0]
                    except Exception as exc:  # reported with the others at the end
                        errors.append(f"{user}: {exc}")
                        return
                    task.seen_done, task.status = time.time(), done["status"]
                    if task.status != "STATUS_SUCCESSFUL":
                        errors.append(f"task {task.id}: {task.status} {nc.error_message(task.id)}")

            started = time.time()
            threads = [threading.Thread(target=client, args=(u,)) for u in users]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            took = max([t.seen_done for t in tasks if t.seen_done] or [time.time()]) - started
            cpu = cpu_seconds(php_pgid) - cpu0[0], process_cpu(proc.proc.pid) - cpu0[1]
            time.sleep(0.5)  # the last delivery's log line
            timeline = exapp_timeline(proc.output())
        finally:
            if proc is not None:
                proc.stop()
            stop_server(root / "server")

    alone = in_process(bundle, args) if args.in_process else []
    done = [t for t in tasks if t.status == "STATUS_SUCCESSFUL"]
    print(f"ExApp on a real Nextcloud 32.0.1 (php -S, 8 workers): {bundle.name} at {args.size}², {args.steps} "
          f"step(s), guidance {args.guidance:g}, {args.decoder} decoder, {args.threads} thread(s), {args.workers} "
          f"worker(s), ExApp poll {args.poll_interval:g} s; {args.clients} user(s) looking every "
          f"{args.look_every:g} s")
    print(f"server up in {server_ready:.1f} s, ExApp registered and ready in {loaded:.1f} s"
          + (" (the admin's defaults set to this shape and made ready first)" if prepared else ""))
    latency = [t.seen_done - t.scheduled for t in done]
    if done:
        print(f"{len(done)} images in {took:.1f} s = {len(done) / took * 3600:,.0f} images/hour "
              f"({len(done) / took * 3600 / 120:.1f}× the 120 requests/hour of Nextcloud's own text2image app)")
        print(f"schedule → SUCCESSFUL: p50 {statistics.median(latency):.2f} s, p95 {percentile(latency, 0.95):.2f} s")
        print(f"CPU per task: PHP {cpu[0] / len(done):.2f} s, ExApp {cpu[1] / len(done):.2f} s")
    if alone:
        print(f"the same image service in this process, without Nextcloud, right after: median "
              f"{statistics.median(alone):.2f} s per image, prompt → PNG ({len(alone)} images)")
    print("per task (s): queue = scheduled → taken; gen = taken → generated (first step, steps [progress waits], "
          "decode+PNG, cancel check, journal); up/result = the calls; seen = delivered → the user saw it")
    print(f"{'task':>5} {'user':>6} {'queue':>6} {'gen':>6} {'1st':>6} {'steps':>6} {'[wait]':>6} {'dec+png':>7} "
          f"{'check':>6} {'jrnl':>6} {'up':>6} {'result':>6} {'seen':>6} {'total':>6}")
    rows = []
    for t in done:
        x = timeline.get(t.id, {})
        if not {"taken", "generated", "delivered", "upload"} <= x.keys():
            continue
        row = (x["taken"] - t.scheduled, x["generated"] - x["taken"], x.get("to the first step's end", 0),
               x.get("steps", 0), x.get("in progress reports", 0), x.get("decode and PNG", 0),
               x.get("cancel check", 0), x.get("journal", 0), x["upload"], x["result"],
               t.seen_done - x["delivered"], t.seen_done - t.scheduled)
        rows.append(row)
        print(f"{t.id:>5} {t.user:>6} " + " ".join(f"{v:>6.3f}" if i != 5 else f"{v:>7.3f}"
                                                    for i, v in enumerate(row)))
    if rows:
        medians = [statistics.median(c) for c in zip(*rows, strict=True)]
        print("median       " + " ".join(f"{v:>6.3f}" if i != 5 else f"{v:>7.3f}" for i, v in enumerate(medians)))
    if errors:
        print(f"errors: {errors[:3]}")


if __name__ == "__main__":
    main()
