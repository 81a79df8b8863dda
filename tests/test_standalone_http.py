"""Every endpoint of the standalone service's HTTP API, in process on the tiny real model: Nextcloud's paths,
parameters, task JSON, OCS envelope and status codes."""

from __future__ import annotations

import io
import json
import logging
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from standalone_helpers import ALICE, BOB, USERS, Client, basic, load_service, wait_until

from backend.config import Settings
from backend.standalone.http_api import OPENAPI_FILE, ROUTES
from backend.standalone.server import StandaloneServer

QUICK = {"steps": 2}
NEXTCLOUD_FIELDS = ["id", "status", "userId", "appId", "input", "identifier", "numberOfImages",
                    "completionExpectedAt"]


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    return load_service(onnx_bundle)


def _server(tmp_path: Path, services: list[Any], sync_budget: float = 0.0) -> StandaloneServer:
    s = Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, threads=1)
    server = StandaloneServer(s, services=services, sync_budget=sync_budget)
    server.start()
    return server


@pytest.fixture
def server(tmp_path: Path, service: Any) -> Iterator[StandaloneServer]:
    srv = _server(tmp_path, [service])
    yield srv
    srv.close()


@pytest.fixture
def alice(server: StandaloneServer) -> Iterator[Client]:
    client = Client(server.url, basic(*ALICE))
    yield client
    client.close()


def _done(client: Client, task_id: int) -> dict[str, Any] | None:
    task = client.get(f"task/{task_id}").data["task"]
    return task if task["status"] in (3, 4) else None


def test_is_available_is_public_and_says_whether_a_model_is_loaded(server: StandaloneServer, tmp_path: Path) -> None:
    reply = Client(server.url).get("is_available")
    assert reply.status == 200
    assert reply.json == {"ocs": {"meta": {"status": "ok", "statuscode": 200, "message": "OK"},
                                  "data": {"isAvailable": True}}}
    empty = _server(tmp_path / "other", [])
    try:
        bare = Client(empty.url, basic(*ALICE))
        assert bare.get("is_available").data == {"isAvailable": False}
        refused = bare.schedule(steps=2)
        assert refused.status == 412 and refused.json["ocs"]["meta"]["status"] == "failure"
        assert refused.message == "No text to image provider is available: the model is still loading"
        assert refused.data == {"message": refused.message}
    finally:
        empty.close()


def test_schedule_get_image_and_the_task_json(alice: Client, server: StandaloneServer) -> None:
    reply = alice.schedule("a red fox", "my_app", 2, identifier="batch-1", seed=5, size="320x256", **QUICK)
    assert reply.status == 200 and reply.json["ocs"]["meta"]["statuscode"] == 200
    task = reply.data["task"]
    assert list(task)[:8] == NEXTCLOUD_FIELDS
    assert task | {"id": 0, "completionExpectedAt": 0} == {
        "id": 0, "status": 1, "userId": "alice", "appId": "my_app", "input": "a red fox", "identifier": "batch-1",
        "numberOfImages": 2, "completionExpectedAt": 0, "errorMessage": None,
        "options": {"seed": 5, "size": "320x256", "steps": 2}, "progress": 0.0}
    assert isinstance(task["id"], int) and isinstance(task["completionExpectedAt"], int)
    seen: list[float] = []

    def finished() -> dict[str, Any] | None:
        now = alice.get(f"task/{task['id']}").data["task"]
        seen.append(now["progress"])
        return now if now["status"] in (3, 4) else None

    done = wait_until(finished, 60, every=0.01, what="the task")
    assert done["status"] == 3 and done["progress"] == 1.0
    assert seen == sorted(seen) and all(0 <= p <= 1 for p in seen), "progress only goes up"
    for index in range(2):
        image = alice.get(f"task/{task['id']}/image/{index}")
        assert image.status == 200 and image.headers["content-type"] == "image/png"
        with Image.open(io.BytesIO(image.body)) as im:
            assert im.size == (320, 256) and im.text["seed"] == str(5 + index)


def test_schedule_takes_a_form_body_and_query_parameters(alice: Client) -> None:
    form = alice.post("schedule?identifier=q", "input=a+cat&appId=forms&numberOfImages=1&steps=2&guidance=1.5",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 200, form
    task = form.data["task"]
    assert (task["input"], task["identifier"], task["numberOfImages"]) == ("a cat", "q", 1)
    assert task["options"] == {"steps": 2, "guidance": 1.5}
    assert alice.post("schedule?input=dog&appId=forms&numberOfImages=1&steps=2&format=json").status == 200


def test_number_of_images_defaults_to_eight_as_in_nextcloud(alice: Client) -> None:
    reply = alice.post("schedule", {"input": "a red fox", "appId": "app", "steps": 1})
    assert reply.data["task"]["numberOfImages"] == 8
    assert alice.delete(f"task/{reply.data['task']['id']}").status == 200


def test_delete_answers_the_task_and_removes_its_images(alice: Client, server: StandaloneServer) -> None:
    task_id = alice.schedule(n=2, **QUICK).data["task"]["id"]
    wait_until(lambda: _done(alice, task_id), 60, what="the task")
    folder = server.manager.store.image_dir(task_id)
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png"]
    reply = alice.delete(f"task/{task_id}")
    assert reply.status == 200 and reply.data["task"]["id"] == task_id and reply.data["task"]["status"] == 3
    assert not folder.exists()
    for path in (f"task/{task_id}", f"task/{task_id}/image/0"):
        gone = alice.get(path)
        assert gone.status == 404 and gone.message in ("Task not found", "Image not found")
    assert alice.delete(f"task/{task_id}").status == 404


def test_tasks_by_app_with_and_without_identifier(alice: Client, server: StandaloneServer) -> None:
    bob = Client(server.url, basic(*BOB))
    ids = [c.schedule(app=app, identifier=ident, **QUICK).data["task"]["id"]
           for c, app, ident in [(alice, "a1", ""), (alice, "a1", "x"), (alice, "a2", "x"), (bob, "a1", "x")]]

    def listed(client: Client, query: str) -> list[int]:
        reply = client.get(f"tasks/app/{query}")
        assert reply.status == 200, reply
        return [t["id"] for t in reply.data["tasks"]]

    assert listed(alice, "a1") == ids[:2]
    assert listed(alice, "a1?identifier=x") == [ids[1]]
    assert listed(alice, "a1?identifier=") == [ids[0]]
    assert listed(alice, "a2") == [ids[2]]
    assert listed(bob, "a1") == [ids[3]]
    assert listed(alice, "nothing") == []
    assert all(set(t) >= set(NEXTCLOUD_FIELDS) for t in alice.get("tasks/app/a1").data["tasks"])


def test_a_short_task_runs_before_the_answer_when_it_fits_the_sync_budget(tmp_path: Path, service: Any) -> None:
    server = _server(tmp_path, [service], sync_budget=60.0)
    try:
        client = Client(server.url, basic(*ALICE))
        task = client.schedule(**QUICK).data["task"]
        assert task["status"] == 3 and client.get(f"task/{task['id']}/image/0").status == 200
        shutil.rmtree(server.manager.store.images_dir)
        server.manager.store.images_dir.write_text("not a folder")  # saving fails: the answer shows FAILED
        failed = client.schedule(**QUICK)
        assert failed.status == 200 and failed.data["task"]["status"] == 4
        assert "internal error" in failed.data["task"]["errorMessage"]
    finally:
        server.close()


def test_an_unexpected_error_is_a_500_with_a_logged_traceback_and_the_service_carries_on(
        alice: Client, server: StandaloneServer, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    broken, fine = (alice.schedule(**QUICK).data["task"]["id"] for _ in range(2))
    wait_until(lambda: _done(alice, fine), 60, what="the tasks")
    # A damaged row (issue #11, row 6) is that task's failure, not the service's.
    with sqlite3.connect(server.manager.store.data_dir / "tasks.sqlite3") as db:
        db.execute("UPDATE tasks SET options = '{not json' WHERE id = ?", (broken,))
    damaged = alice.get(f"task/{broken}")
    assert damaged.status == 200 and damaged.data["task"]["status"] == 4
    assert "damaged" in damaged.data["task"]["errorMessage"]
    assert alice.get("tasks/app/app").status == 200
    # A failure no check foresaw: 500, the traceback in the log, and the next request is answered.
    def boom(*_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.manager, "get_user_task", boom)
    with caplog.at_level(logging.ERROR):
        reply = alice.get(f"task/{fine}")
    assert reply.status == 500 and "internal error" in reply.message
    assert any(r.exc_info for r in caplog.records), "the traceback must be logged"
    monkeypatch.undo()
    assert alice.get(f"task/{fine}/image/0").status == 200


def test_methods_and_unknown_paths(alice: Client) -> None:
    wrong = alice.request("PUT", "schedule", {"input": "x"})
    assert wrong.status == 405 and wrong.headers["allow"] == "POST" and "PUT is not allowed" in wrong.message
    assert alice.get("schedule").status == 405
    for path in ("nope", "task", "task/1/image", "/ocs/v1.php/text2image/is_available", "/page/none.js"):
        reply = alice.get(path)
        assert reply.status == 404 and "no such endpoint" in reply.message, (path, reply)
    assert alice.get("is_available?x=1").message == "unknown parameter 'x'; allowed: none"


def test_openapi_describes_every_route_and_is_served(server: StandaloneServer) -> None:
    reply = Client(server.url).get("openapi.json")
    assert reply.status == 200 and reply.body == OPENAPI_FILE.read_bytes()
    spec = json.loads(reply.body)
    documented = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    routed = {("/" + "/".join(pattern), method) for pattern, methods in ROUTES for method in methods}
    assert documented == routed
    task_schema = spec["components"]["schemas"]["Task"]
    assert task_schema["required"] == NEXTCLOUD_FIELDS
