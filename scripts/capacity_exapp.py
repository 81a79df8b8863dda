"""How many people one ExApp serves through Nextcloud's task queue: N users schedule one-image tasks on the fake
Nextcloud of the tests (the server's measured rules, nc_py_api unchanged as the client) and the ExApp process
takes them as it would from a real server; bounded in time.

    python scripts/capacity_exapp.py BUNDLE [--clients 2] [--seconds 60] [--workers 1] [--threads N]
                                            [--decoder taesd] [--greedy] [--nextcloud 32|33]
                                            [--size 512] [--steps 1] [--guidance 0]

Each user schedules a one-image task, waits until Nextcloud shows it done, and schedules the next, until the time is
up. With ``--greedy`` one more user schedules a 12-image task first. Prints images per hour, p50/p95 latency of the
one-image tasks (schedule → SUCCESSFUL, as the user's Assistant sees it), the ExApp's peak memory, and from its
debug timeline where each task's time went (generation, journal, upload, result). Nextcloud 32 never triggers, so
the ExApp finds new tasks by polling (``T2I_POLL_INTERVAL``, 5 s by default when idle); 33 triggers it.
"""

from __future__ import annotations

import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the fake Nextcloud lives with the tests
sys.path.insert(0, str(REPO))

from capacity import drive, load_options  # noqa: E402  (its folder is on sys.path when run as a script)
from fake_nextcloud import ExAppProcess, FakeNextcloud  # noqa: E402

PROMPT = "a red fox in the snow"


def memory_mb(pid: int) -> dict[str, float]:
    """VmHWM and VmRSS of process ``pid`` in MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            found[key] = int(value.split()[0]) / 1024
    return found


#: The parts of a task's time that the worker's debug timeline line names, in its order (seconds each).
PARTS = ("to the thread", "to the first step's end", "steps", "in progress reports", "decode and PNG", "back",
         "cancel check", "journal")


def task_parts(log: str) -> dict[int, dict[str, float]]:
    """Per task id, from the ExApp's debug lines: the :data:`PARTS` of its time, and its upload and result calls."""
    found: dict[int, dict[str, float]] = {}
    for m in re.finditer(r"task (\d+) timeline: upload ([\d.]+) s, result ([\d.]+) s", log):
        found.setdefault(int(m[1]), {}).update(upload=float(m[2]), result=float(m[3]))
    for m in re.finditer(r"task (\d+) timeline: to the thread (.*)", log):
        numbers = [float(x) for x in re.findall(r"([\d.]+) s\b", m[0])]
        if len(numbers) == len(PARTS):
            found.setdefault(int(m[1]), {}).update(zip(PARTS, numbers, strict=True))
    return found


def timeline(log: str) -> dict[str, list[float]]:
    """Seconds per task spent in each phase, from the ExApp's debug lines (generation: from taking the task until
    the images are back on the event loop, progress reports included)."""
    phases: dict[str, list[float]] = {"generation": [], "cancel check": [], "journal": [], "upload": [],
                                      "result": []}
    for parts in task_parts(log).values():
        if "journal" in parts:
            phases["generation"].append(sum(parts[p] for p in PARTS[:6] if p != "in progress reports"))
            phases["cancel check"].append(parts["cancel check"])
            phases["journal"].append(parts["journal"])
        if "upload" in parts:
            phases["upload"].append(parts["upload"])
            phases["result"].append(parts["result"])
    return phases


def main() -> None:
    parser = load_options(__doc__, clients=2)
    parser.add_argument("--nextcloud", type=int, default=32, choices=[32, 33],
                        help="the fake Nextcloud's version (default: %(default)s)")
    args = parser.parse_args()

    users = [f"user{i}" for i in range(args.clients + 1)]
    fake = FakeNextcloud(version=args.nextcloud, users=tuple(users)).start()
    env = {"T2I_MODEL": str(args.bundle.resolve()), "T2I_DECODER": args.decoder}
    if args.threads:
        env["T2I_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="t2i-capacity-exapp-") as storage:
        proc = ExAppProcess(fake, Path(storage), env, args=("--workers", str(args.workers)), verbose=2)
        try:
            t_load = time.monotonic()
            fake.install(proc, timeout=1800)
            loaded = time.monotonic() - t_load
            task_input = {"input": PROMPT, "size": f"{args.size}x{args.size}", "steps": args.steps,
                          "guidance": args.guidance}

            def one(user: str, n: int) -> float:
                t0 = time.monotonic()
                tid = fake.schedule({**task_input, "numberOfImages": n}, user=user)
                done = fake.wait([tid], timeout=3600)[0]
                if done["status"] != "STATUS_SUCCESSFUL":
                    raise RuntimeError(f"task {tid}: {done['status']} {done.get('_error')}")
                return time.monotonic() - t0

            load = drive(one, users, args.seconds, args.greedy)
            assert proc.proc is not None
            memory = memory_mb(proc.proc.pid)
            phases = timeline(proc.output())
        finally:
            proc.stop()
            fake.stop()
    print(f"ExApp on fake Nextcloud {args.nextcloud}: {args.bundle} at {args.size}², {args.steps} step(s), guidance "
          f"{args.guidance:g}, {args.decoder} decoder; {args.clients} user(s), {args.workers} worker(s), "
          f"threads {args.threads or 'all'}")
    load.report(f"installed and ready in {loaded:.1f} s")
    for name, values in phases.items():
        if values:
            print(f"  per task, {name}: median {statistics.median(values):.3f} s ({len(values)} tasks)")
    print(f"ExApp memory: peak {memory.get('VmHWM', 0):.0f} MB, at the end {memory.get('VmRSS', 0):.0f} MB")
    if load.errors:
        print(f"errors: {load.errors[:3]}")


if __name__ == "__main__":
    main()
