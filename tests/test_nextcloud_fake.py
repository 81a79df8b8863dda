"""The fake Nextcloud answers like the real one measured in research/nextcloud_server_behaviour.md, when driven by
nc_py_api's own async API (as the ExApp drives it). No model needed."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fake_nextcloud import APP_ID, APP_VERSION, SECRET, FakeNextcloud, ScheduleError
from nc_py_api import AsyncNextcloudApp, NextcloudException
from nc_py_api.ex_app.providers.task_processing import (
    ShapeDescriptor,
    ShapeEnumValue,
    ShapeType,
    TaskProcessingProvider,
)

SIZE = ShapeDescriptor(name="size", description="size", shape_type=ShapeType.ENUM)
SEED = ShapeDescriptor(name="seed", description="seed", shape_type=ShapeType.NUMBER)


def _provider(pid: str) -> TaskProcessingProvider:
    return TaskProcessingProvider(
        id=pid, name=pid, task_type="core:text2image", expected_runtime=10, optional_input_shape=[SIZE, SEED],
        optional_input_shape_enum_values={"size": [ShapeEnumValue(name="512x512", value="512x512")]},
        optional_input_shape_defaults={"size": "512x512", "seed": 42})


@pytest.fixture(params=[32, 33])
def fake(request: pytest.FixtureRequest):
    nc = FakeNextcloud(version=request.param).start()
    yield nc
    nc.stop()


def _run(fake: FakeNextcloud, body: Any, secret: str = SECRET) -> Any:
    async def go() -> Any:
        nc = AsyncNextcloudApp(nextcloud_url=fake.url, app_id=APP_ID, app_version=APP_VERSION, app_secret=secret)
        return await body(nc.providers.task_processing, nc)

    return asyncio.run(go())


def test_scheduling_checks_types_not_ranges(fake: FakeNextcloud) -> None:
    _run(fake, lambda tp, _: tp.register(_provider("p1")))
    for value in (0, -1, 13, 1.5, "3"):
        tid = fake.schedule({"input": "x", "numberOfImages": value})
        assert fake.task(tid)["input"]["numberOfImages"] == value
    tid = fake.schedule({"input": "x" * 100_000, "numberOfImages": 1, "foo": 1, "seed": None})
    assert fake.task(tid)["input"] == {"input": "x" * 100_000, "numberOfImages": 1, "size": "512x512", "seed": None}
    for bad, message in (({"numberOfImages": True}, "Non-numeric item provided for Number slot"),
                         ({"numberOfImages": None}, 'Missing key: "numberOfImages"'),
                         ({"input": 5}, '"input": Non-text item provided for Text slot'),
                         ({"size": 5}, "Non-text item provided for Enum slot"),
                         ({"size": "300x300"}, 'Got "300x300", but expected one of the provided enum values: '
                                               '"512x512"')):
        with pytest.raises(ScheduleError, match=message):
            fake.schedule({"input": "x", "numberOfImages": 1, **bad})


def test_next_goes_to_the_preferred_provider_and_to_one_poller(fake: FakeNextcloud) -> None:
    _run(fake, lambda tp, _: tp.register(_provider("p1")))
    _run(fake, lambda tp, _: tp.register(_provider("p2")))
    assert _run(fake, lambda tp, _: tp.next_task(["p1"], ["core:text2image"])) == {}
    tids = [fake.schedule({"input": "x", "numberOfImages": 1}) for _ in range(40)]
    assert _run(fake, lambda tp, _: tp.next_task(["p2"], ["core:text2image"])) == {}  # not preferred
    assert _run(fake, lambda tp, _: tp.next_task(["p1"], ["other"])) == {}
    got: list[int] = []

    def poll() -> None:
        while found := _run(fake, lambda tp, _: tp.next_task(["p1", "p2"], ["core:text2image"])):
            assert found["provider"] == {"name": "p1"}
            got.append(found["task"]["id"])

    threads = [threading.Thread(target=poll) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == tids  # each handed out once
    fake.preferences["core:text2image"] = "p2"
    tid = fake.schedule({"input": "x", "numberOfImages": 1})
    assert _run(fake, lambda tp, _: tp.next_task(["p2"], ["core:text2image"]))["task"]["id"] == tid


def test_progress_cancel_upload_and_results(fake: FakeNextcloud) -> None:
    _run(fake, lambda tp, _: tp.register(_provider("p1")))
    tid = fake.schedule({"input": "x", "numberOfImages": 1})
    assert _run(fake, lambda tp, _: tp.set_progress(tid, 150.0)) == {}  # 500
    assert _run(fake, lambda tp, _: tp.set_progress(tid, 30.0))["task"]["status"] == "STATUS_RUNNING"
    fake.cancel(tid)
    answer = _run(fake, lambda tp, _: tp.set_progress(tid, 60.0))
    assert answer["task"]["status"] == "STATUS_CANCELLED" and answer["task"]["progress"] == 0.3
    fid = _run(fake, lambda tp, _: tp.upload_result_file(tid, b"png"))
    _run(fake, lambda tp, _: tp.report_result(tid, {"images": [fid]}))
    assert fake.task(tid)["status"] == "STATUS_CANCELLED" and fake.task(tid)["output"] is None

    a, b, c, d = (fake.schedule({"input": "x", "numberOfImages": 1}) for _ in range(4))
    fid = _run(fake, lambda tp, _: tp.upload_result_file(a, b"png"))
    _run(fake, lambda tp, _: tp.report_result(a, {"images": [fid], "extra": 1}))
    _run(fake, lambda tp, _: tp.report_result(b, {"images": [999999]}))
    _run(fake, lambda tp, _: tp.report_result(c, None, "e" * 5000))
    with pytest.raises(NextcloudException) as err:  # 32 has no userFacingErrorMessage: alone it is a 500
        _run(fake, lambda tp, nc: nc.ocs("POST", f"/ocs/v2.php/taskprocessing/tasks_provider/{d}/result",
                                         json={"taskId": d, "userFacingErrorMessage": "for the user"}))
    assert err.value.status_code == 500 and fake.task(d)["status"] == "STATUS_SCHEDULED"
    assert fake.task(a)["output"] == {"images": [fid]} and fake.task(a)["status"] == "STATUS_SUCCESSFUL"
    assert fake.task(b)["status"] == "STATUS_FAILED" and "outputShape" in fake.task(b)["_error"]
    assert fake.task(c)["status"] == "STATUS_FAILED" and len(fake.task(c)["_error"]) == 1000
    assert "_error" not in _run(fake, lambda tp, _: tp.set_progress(c, 10.0))["task"]


def test_auth_failures(fake: FakeNextcloud) -> None:
    _run(fake, lambda tp, _: tp.register(_provider("p1")))
    fake.schedule({"input": "x", "numberOfImages": 1})
    with pytest.raises(NextcloudException) as err:
        _run(fake, lambda tp, nc: nc.ocs("GET", "/ocs/v2.php/taskprocessing/tasks_provider/next",
                                         json={"providerIds": ["p1"], "taskTypeIds": ["core:text2image"]}),
             secret="wrong")
    assert err.value.status_code == 412
    with pytest.raises(NextcloudException) as err:
        _run(fake, lambda tp, _: tp.register(_provider("p3")), secret="wrong")
    assert err.value.status_code == 401
    fake.enabled = False
    assert _run(fake, lambda _, nc: nc.enabled_state) is False
    assert _run(fake, lambda tp, _: tp.next_task(["p1"], ["core:text2image"])) == {}


def test_progress_starts_at_0_and_started_at_stays_null(fake: FakeNextcloud) -> None:
    # Measured on Nextcloud 32.0.1 (issue #12, finding 7): a new task's progress is 0, and startedAt stays null
    # through hand-out and progress reports.
    _run(fake, lambda tp, _: tp.register(_provider("p1")))
    tid = fake.schedule({"input": "x", "numberOfImages": 1})
    assert fake.task(tid)["progress"] == 0 and fake.task(tid)["startedAt"] is None
    handed = _run(fake, lambda tp, _: tp.next_task(["p1"], ["core:text2image"]))
    assert handed["task"]["id"] == tid and handed["task"]["startedAt"] is None
    _run(fake, lambda tp, _: tp.set_progress(tid, 50.0))
    assert fake.task(tid)["status"] == "STATUS_RUNNING" and fake.task(tid)["startedAt"] is None
