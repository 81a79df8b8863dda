"""The real ``text2image serve --standalone`` as a process: scheduled tasks survive a stop and a start, and a
kill -9 in the middle of a task loses nothing and leaves nothing RUNNING. The first test runs the README's command
as it is: no Nextcloud, no users configured, the default data directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from standalone_helpers import ALICE, USERS, Client, ServiceProcess, basic, wait_until

from backend.standalone.store import TaskStore
from backend.standalone.task import TaskStatus

Spawn = Callable[..., ServiceProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start service processes; any still running at the end of the test is killed."""
    started: list[ServiceProcess] = []

    def start(env: dict[str, str], log: Path, port: int | None = None) -> ServiceProcess:
        started.append(ServiceProcess(env, log, port))
        return started[-1]

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.kill()


def _statuses(data_dir: Path) -> dict[int, TaskStatus]:
    store = TaskStore(data_dir, create=False)
    try:
        return {t.id or 0: t.status for t in store.find()}
    finally:
        store.close()


def _all_successful(client: Client, app: str, count: int) -> bool:
    tasks = client.get(f"tasks/app/{app}").data["tasks"]
    return len(tasks) == count and all(t["status"] == 3 for t in tasks)


def test_ten_scheduled_tasks_survive_a_restart_on_the_default_store(tmp_path: Path, onnx_bundle: Path,
                                                                   spawn: Spawn) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "xdg"), "T2I_MODEL": str(onnx_bundle)}
    data_dir = tmp_path / "xdg" / "text2image-sd2" / "tasks"  # Settings().data_dir under this XDG_DATA_HOME
    log = tmp_path / "service.log"
    service = spawn(env, log)
    token = wait_until(lambda: (data_dir / "credentials").is_file() and (data_dir / "credentials").read_text(),
                       60, what="the generated credentials").strip().split(":", 1)[1]
    client = Client(service.url, f"Bearer {token}")
    service.wait_ready(client)
    ids = [client.schedule(f"fox {i}", "restart", 1, steps=10).data["task"]["id"] for i in range(10)]
    assert service.stop() == 0
    before = _statuses(data_dir)
    unfinished = [i for i in ids if before[i] != TaskStatus.SUCCESSFUL]
    print(f"\nat the stop: {len(unfinished)} of 10 not finished, {_counts(before)}")
    assert unfinished and TaskStatus.RUNNING not in before.values()  # the running one went back to the queue

    service = spawn(env, log, service.port)  # the same service started again
    client.close()
    service.wait_ready(client)
    wait_until(lambda: _all_successful(client, "restart", 10), 120, what="all 10 tasks")
    for task_id in ids:
        assert client.get(f"task/{task_id}/image/0").headers["content-type"] == "image/png"
    assert service.stop() == 0
    store = TaskStore(data_dir, create=False)
    assert store.check() == [] and len(store.find()) == 10
    store.close()


def test_kill_9_during_a_task_loses_nothing_and_leaves_nothing_running(tmp_path: Path, onnx_bundle: Path,
                                                                       spawn: Spawn) -> None:
    data_dir = tmp_path / "data"
    env = {"T2I_DATA_DIR": str(data_dir), "T2I_USERS": USERS, "T2I_MODEL": str(onnx_bundle)}
    log = tmp_path / "service.log"
    service = spawn(env, log)
    client = Client(service.url, basic(*ALICE))
    service.wait_ready(client)
    slow = client.schedule("a slow fox", "crash", 2, steps=40).data["task"]["id"]
    queued = [client.schedule(f"fox {i}", "crash", 1, steps=5).data["task"]["id"] for i in range(3)]
    wait_until(lambda: client.get(f"task/{slow}").data["task"]["status"] == 2, 30, what="the slow task to run")
    service.kill()
    at_crash = _statuses(data_dir)
    print(f"\nat the kill -9: {_counts(at_crash)}")
    assert at_crash[slow] == TaskStatus.RUNNING and all(at_crash[i] == TaskStatus.SCHEDULED for i in queued)

    service = spawn(env, log, service.port)  # the same service started again
    client.close()
    service.wait_ready(client)
    wait_until(lambda: _all_successful(client, "crash", 4), 120, what="all 4 tasks")
    assert service.stop() == 0
    store = TaskStore(data_dir, create=False)
    assert store.details(slow)["attempts"] == 2  # type: ignore[index]
    assert store.check() == [] and sorted(t.id for t in store.find()) == sorted([slow, *queued])
    store.close()


def _counts(statuses: dict[int, TaskStatus]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status.name] = counts.get(status.name, 0) + 1
    return counts
