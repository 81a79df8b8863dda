"""The standalone TaskManager on the tiny real model: every operation, both paths of run_or_schedule_task, events
once each, identifier filtering, deletion with images, failures, crash recovery and cleanup."""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from standalone_helpers import load_service, wait_until

from backend.standalone.manager import INTERNAL_ERROR, TaskManager
from backend.standalone.store import TaskStore
from backend.standalone.task import (
    NoProviderError,
    Task,
    TaskFailedError,
    TaskNotFoundError,
    TaskStatus,
)
from backend.tasks import task_input
from runtime.errors import InvalidRequest, T2IError

QUICK = {"steps": 2}
SLOW = {"steps": 100}  # with 4 images: several seconds, long enough to catch the task RUNNING


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    return load_service(onnx_bundle)


class Recorder:
    """Collects the events a manager fires."""

    def __init__(self, manager: TaskManager) -> None:
        self.success: list[Any] = []
        self.failure: list[Any] = []
        manager.on_success(self.success.append)
        manager.on_failure(self.failure.append)

    def ids(self) -> tuple[Counter[int], Counter[int]]:
        return Counter(e.task.id for e in self.success), Counter(e.task.id for e in self.failure)


@pytest.fixture
def manager(tmp_path: Path, service: Any) -> Iterator[TaskManager]:
    with TaskManager(tmp_path / "data", services=[service]) as m:
        yield m


def _status(manager: TaskManager, task_id: int | None) -> TaskStatus:
    assert task_id is not None
    return manager.get_task(task_id).status


def _finished(manager: TaskManager, *tasks: Task) -> bool:
    return all(_status(manager, t.id) in (TaskStatus.SUCCESSFUL, TaskStatus.FAILED) for t in tasks)


def test_schedule_runs_in_background_with_one_success_event_each(manager: TaskManager) -> None:
    events = Recorder(manager)
    tasks = [manager.schedule_task(Task.new(f"fox {i}", "app", 2, "alice", options={**QUICK, "seed": 10 * i}))
             for i in range(3)]
    assert all(t.status == TaskStatus.SCHEDULED and t.id for t in tasks)
    assert all(t.completion_expected_at and t.completion_expected_at >= int(time.time()) for t in tasks)
    wait_until(lambda: _finished(manager, *tasks), 60, what="3 tasks")
    time.sleep(0.2)  # an extra event would come right after the status change
    assert events.ids() == (Counter({t.id: 1 for t in tasks}), Counter())
    for i, task in enumerate(tasks):
        done = manager.get_task(task.id or 0)
        assert done.status == TaskStatus.SUCCESSFUL and done.seeds == [10 * i, 10 * i + 1]
        paths = [manager.image_path(done, k) for k in range(2)]
        assert paths == next(e.images for e in events.success if e.task.id == task.id)
        for path in paths:
            with Image.open(path) as im:
                assert im.size == (256, 256) and im.text["seed"] in {str(s) for s in done.seeds}


def test_run_task_is_synchronous(manager: TaskManager) -> None:
    events = Recorder(manager)
    task = Task.new("a red fox", "app", 1, "alice", options={**QUICK, "size": "320x256"})
    assert manager.run_task(task) is task
    assert task.status == TaskStatus.SUCCESSFUL and task.id is not None
    with Image.open(manager.image_path(task, 0)) as im:
        assert im.size == (320, 256)
    assert events.ids() == (Counter({task.id: 1}), Counter())


def test_run_or_schedule_takes_both_paths(manager: TaskManager, service: Any) -> None:
    raw = {"input": "a red fox", "numberOfImages": 2, **QUICK}
    expected = service.expected_seconds(task_input.parse(raw))
    fits = manager.run_or_schedule_task(Task.new("a red fox", "app", 2, "alice", options=QUICK), expected * 1.5)
    assert fits.status == TaskStatus.SUCCESSFUL  # ran before returning
    too_long = manager.run_or_schedule_task(Task.new("a red fox", "app", 2, "alice", options=QUICK), expected * 0.5)
    assert too_long.status == TaskStatus.SCHEDULED
    wait_until(lambda: _finished(manager, too_long), 60, what="the scheduled task")
    assert _status(manager, too_long.id) == TaskStatus.SUCCESSFUL


def test_get_task_and_get_user_task(manager: TaskManager) -> None:
    task = manager.run_task(Task.new("a red fox", "app", 1, "alice", options=QUICK))
    assert task.id is not None
    assert manager.get_task(task.id).to_json() == task.to_json()
    assert manager.get_user_task(task.id, "alice").input == "a red fox"
    with pytest.raises(TaskNotFoundError):
        manager.get_user_task(task.id, "bob")
    with pytest.raises(TaskNotFoundError):
        manager.get_user_task(task.id, None)
    with pytest.raises(TaskNotFoundError):
        manager.get_task(task.id + 1000)


def test_tasks_by_app_filter_on_user_app_and_identifier(manager: TaskManager) -> None:
    made = [manager.schedule_task(Task.new("fox", app, 1, user, ident, QUICK))
            for user, app, ident in [("alice", "app1", ""), ("alice", "app1", "x"), ("alice", "app2", "x"),
                                     ("bob", "app1", "x"), ("alice", "app1", "x")]]
    ids = [t.id for t in made]

    def found(*args: Any) -> list[int | None]:
        return [t.id for t in manager.get_user_tasks_by_app(*args)]

    assert found("alice", "app1") == [ids[0], ids[1], ids[4]]
    assert found("alice", "app1", "x") == [ids[1], ids[4]]
    assert found("alice", "app1", "") == [ids[0]]
    assert found("alice", "app2", None) == [ids[2]]
    assert found("bob", "app1", "x") == [ids[3]]
    assert found("bob", "app2") == [] and found("carol", "app1") == []
    wait_until(lambda: _finished(manager, *made), 60, what="5 tasks")


def test_a_long_task_lets_other_users_in_between_its_batches(manager: TaskManager) -> None:
    # Issue #14: first come, first served let one user's 12-image task hold everyone else up for its whole run.
    events = Recorder(manager)
    big = manager.schedule_task(Task.new("many foxes", "app", 12, "alice", options={"steps": 6, "seed": 10}))
    wait_until(lambda: _status(manager, big.id) == TaskStatus.RUNNING, 60, every=0.01, what="the big task")
    own = manager.schedule_task(Task.new("alice again", "app", 1, "alice", options=QUICK))
    other = manager.schedule_task(Task.new("a cat", "app", 1, "bob", options=QUICK))
    wait_until(lambda: _finished(manager, big, own, other), 120, what="the tasks")
    order = [e.task.id for e in events.success]
    assert order.index(other.id) < order.index(big.id), "bob's task ran between alice's batches"
    assert order.index(own.id) > order.index(big.id), "alice's own next task waits for her first"
    assert manager.get_task(big.id or 0).seeds == list(range(10, 22)), "image i keeps seed + i"


def test_delete_removes_the_task_and_its_images(manager: TaskManager) -> None:
    task = manager.run_task(Task.new("a red fox", "app", 2, "alice", options=QUICK))
    folder = manager.image_path(task, 0).parent
    assert len(list(folder.glob("*.png"))) == 2
    manager.delete_task(task)
    assert not folder.exists()
    with pytest.raises(TaskNotFoundError):
        manager.get_task(task.id or 0)
    with pytest.raises(TaskNotFoundError):
        manager.delete_task(task)


def test_delete_stops_a_running_task(manager: TaskManager) -> None:
    events = Recorder(manager)
    task = manager.schedule_task(Task.new("a slow fox", "app", 4, "alice", options=SLOW))
    wait_until(lambda: _status(manager, task.id) == TaskStatus.RUNNING, 30, what="RUNNING")
    started = time.monotonic()
    manager.delete_task(task.id or 0)
    quick = manager.run_task(Task.new("next", "app", 1, "alice", options=QUICK))  # waits for the service to be free
    assert quick.status == TaskStatus.SUCCESSFUL and time.monotonic() - started < 10
    assert not manager.store.image_dir(task.id or 0).exists()
    assert events.ids() == (Counter({quick.id: 1}), Counter())


def test_a_failing_task_ends_failed_with_its_message_and_one_failure_event(manager: TaskManager) -> None:
    events = Recorder(manager)
    manager.store.images_dir.write_text("not a folder")  # the images cannot be saved: a real, unexpected failure
    with pytest.raises(TaskFailedError) as raised:
        manager.run_task(Task.new("a red fox", "app", 1, "alice", options=QUICK))
    task = raised.value.task
    assert task.status == TaskStatus.FAILED and task.error_message == INTERNAL_ERROR
    scheduled = manager.schedule_task(Task.new("another fox", "app", 1, "alice", options=QUICK))
    wait_until(lambda: _finished(manager, scheduled), 60, what="the scheduled task")
    assert manager.get_task(scheduled.id or 0).error_message == INTERNAL_ERROR
    time.sleep(0.2)
    assert events.ids() == (Counter(), Counter({task.id: 1, scheduled.id: 1}))
    assert all("Error" in e.error_message and e.error_message != INTERNAL_ERROR for e in events.failure)


def test_a_bug_while_storing_still_ends_the_task_failed(manager: TaskManager, monkeypatch: pytest.MonkeyPatch) -> None:
    # Storing is not only disk errors: whatever it raises, the task must not stay RUNNING without an event.
    events = Recorder(manager)

    def broken(*_: Any) -> None:
        raise RuntimeError("a bug in storing")

    monkeypatch.setattr(manager.store, "save_images", broken)
    with pytest.raises(TaskFailedError) as raised:
        manager.run_task(Task.new("a red fox", "app", 1, "alice", options=QUICK))
    assert raised.value.task.status == TaskStatus.FAILED and raised.value.task.error_message == INTERNAL_ERROR
    assert [e.task.id for e in events.failure] == [raised.value.task.id]
    assert "RuntimeError: a bug in storing" in events.failure[0].error_message


@pytest.mark.parametrize("args, words", [
    (("fox", "../x", 1, "alice"), ["appId", "'../x'"]),
    (("fox", "", 1, "alice"), ["appId"]),
    (("fox", "app", 1, "alice", "i" * 256), ["identifier", "255"]),
    (("fox", "app", 13, "alice"), ["number of images", "13", "1 to 12"]),
    (("", "app", 1, "alice"), ["prompt", "empty"]),
    (("fox", "app", 1, "alice", "", {"input": "other"}), ["unknown option", "'input'"]),
    (("fox", "app", 1, "alice", "", {"size": "500x500"}), ["500", "multiple of 64"]),
    (("fox", "app", 1, "../alice"), ["user id"]),
])
def test_bad_tasks_are_refused_by_name_and_not_stored(manager: TaskManager, args: tuple[Any, ...],
                                                      words: list[str]) -> None:
    with pytest.raises(InvalidRequest) as raised:  # a task is checked where it is made, before any operation
        Task.new(*args)
    assert all(w in str(raised.value) for w in words), str(raised.value)
    assert manager.store.find() == []


def test_without_a_model_there_is_no_provider(tmp_path: Path) -> None:
    with TaskManager(tmp_path) as manager:
        assert not manager.has_providers()
        for operation in (manager.schedule_task, manager.run_task):
            with pytest.raises(NoProviderError):
                operation(Task.new("fox", "app", 1, "alice"))
        with pytest.raises(NoProviderError):
            manager.run_or_schedule_task(Task.new("fox", "app", 1, "alice"), 10)
        assert manager.store.find() == []


def test_one_manager_per_data_directory(tmp_path: Path) -> None:
    with TaskManager(tmp_path), pytest.raises(T2IError, match="another task service is using"):
        TaskManager(tmp_path)
    TaskManager(tmp_path).close()  # free again


def test_close_puts_the_running_task_back_and_it_runs_after_reopening(tmp_path: Path, service: Any) -> None:
    with TaskManager(tmp_path, services=[service]) as manager:
        task = manager.schedule_task(Task.new("a slow fox", "app", 4, "alice", options=SLOW))
        wait_until(lambda: _status(manager, task.id) == TaskStatus.RUNNING, 30, what="RUNNING")
    store = TaskStore(tmp_path)
    assert store.details(task.id or 0)["status"] == TaskStatus.SCHEDULED  # type: ignore[index]
    store.close()
    with TaskManager(tmp_path, services=[service]) as manager:
        events = Recorder(manager)
        manager.delete_task(task.id or 0)  # too slow to finish here; a quick one proves the queue runs
        quick = manager.schedule_task(Task.new("fox", "app", 1, "alice", options=QUICK))
        wait_until(lambda: _finished(manager, quick), 60, what="the queue")
        # The event follows the status change from the service's thread: wait for it, then for any extra one.
        wait_until(lambda: events.ids()[0], 10, what="the success event")
        time.sleep(0.2)
        assert events.ids()[0] == Counter({quick.id: 1})


def test_tasks_running_at_a_crash_run_again_once_then_fail(tmp_path: Path, service: Any) -> None:
    store = TaskStore(tmp_path)
    first_crash = store.insert(Task.new("fox", "app", 1, "alice", options=QUICK), TaskStatus.RUNNING, 1, 0, attempts=1)
    second_crash = store.insert(Task.new("fox", "app", 1, "alice", options=QUICK), TaskStatus.RUNNING, 1, 0, attempts=2)
    waiting = store.insert(Task.new("fox", "app", 1, "bob", options=QUICK), TaskStatus.SCHEDULED, 1, 0)
    store.save_images(first_crash.id or 0, [b"half-written"])  # what a crash mid-save leaves
    store.close()
    with TaskManager(tmp_path, services=[service]) as manager:
        wait_until(lambda: _finished(manager, first_crash, second_crash, waiting), 60, what="recovery")
        assert _status(manager, first_crash.id) == _status(manager, waiting.id) == TaskStatus.SUCCESSFUL
        failed = manager.get_task(second_crash.id or 0)
        assert failed.status == TaskStatus.FAILED and "stopped 2 times" in (failed.error_message or "")
        assert manager.store.check() == []


def test_cleanup_deletes_finished_tasks_older_than_the_age(tmp_path: Path) -> None:
    with TaskManager(tmp_path, max_age_days=7) as manager:
        store = manager.store
        made = {s: store.insert(Task.new("fox", "app", 1, "alice"), s, 1, 0) for s in TaskStatus if s}
        store.save_images(made[TaskStatus.SUCCESSFUL].id or 0, [b"png"])
        assert manager.cleanup() == []
        with sqlite3.connect(tmp_path / "tasks.sqlite3") as db:  # age every task by eight days
            db.execute("UPDATE tasks SET updated_at = updated_at - 8 * 86400")
        removed = manager.cleanup()
        assert sorted(removed) == sorted([made[TaskStatus.SUCCESSFUL].id, made[TaskStatus.FAILED].id])
        assert not store.image_dir(made[TaskStatus.SUCCESSFUL].id or 0).exists()
        assert {t.status for t in store.find()} == {TaskStatus.SCHEDULED, TaskStatus.RUNNING}


@pytest.mark.parametrize(("options", "cli_args", "message"), [
    ({"steps": 1000}, ["--steps", "1000"], "steps 1000 is out of range; use 1 to 100"),
    ({"guidance": 31.5}, ["--guidance", "31.5"], "guidance 31.5 is out of range; use 0 to 30"),
    ({"size": "100x100"}, ["--size", "100x100"], "width 100 is not allowed; use a multiple of 64 from 256 to 1024"),
    ({"scheduler": "heun"}, ["--scheduler", "heun"], "scheduler 'heun' is not known"),
])
def test_one_bad_request_one_message_on_every_front_end(manager: TaskManager, options: dict[str, Any],
                                                       cli_args: list[str], message: str) -> None:
    # Issue #13: every front end only parses into runtime.request.GenerationRequest, which checks each field once.
    from click.testing import CliRunner

    from backend.cli import cli

    with pytest.raises(InvalidRequest) as standalone:
        manager.schedule_task(Task.new("a fox", "app", 1, "alice", options=options))
    with pytest.raises(InvalidRequest) as worker:  # what the Nextcloud worker runs on a task's input
        task_input.parse({"input": "a fox", "numberOfImages": 1, **options})
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", "sd-turbo", "--offline", *cli_args])
    assert message in str(standalone.value) and str(standalone.value) == str(worker.value)
    assert result.exit_code != 0 and message in result.output, result.output
