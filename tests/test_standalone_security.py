"""The standalone service's defences: credentials, users kept apart, ranges, body limits, the per-user rate limit
under 100 concurrent requests, and path-like ids."""

from __future__ import annotations

import base64
import stat
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from standalone_helpers import ALICE, BOB, USERS, Client, Reply, basic, load_service, wait_until

from backend.config import Settings
from backend.standalone.auth import Credentials, RateLimiter
from backend.standalone.http_api import MAX_BODY_BYTES
from backend.standalone.server import StandaloneServer
from backend.standalone.task import TaskStatus
from runtime.errors import T2IError

QUICK = {"steps": 1}


@pytest.fixture(scope="module")
def service(onnx_bundle: Path) -> Any:
    return load_service(onnx_bundle)


@pytest.fixture
def server(tmp_path: Path, service: Any) -> Iterator[StandaloneServer]:
    settings = Settings().updated(data_dir=tmp_path / "data", users=USERS, port=0, threads=1)
    srv = StandaloneServer(settings, services=[service])
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def task_id(server: StandaloneServer) -> int:
    """A finished one-image task of alice."""
    alice = Client(server.url, basic(*ALICE))
    task_id = int(alice.schedule(**QUICK).data["task"]["id"])
    wait_until(lambda: alice.get(f"task/{task_id}").data["task"]["status"] == 3, 60, what="the task")
    return task_id


PRIVATE = [("GET", "task/{id}"), ("DELETE", "task/{id}"), ("GET", "task/{id}/image/0"), ("GET", "tasks/app/app"),
           ("POST", "schedule")]
WRONG = [None, "Bearer nope", "Bearer ", basic("alice", "bob-secret-000022"), basic("mallory", "alice-secret-0001"),
         "Basic !!!notbase64", "Basic " + base64.b64encode(b"no-colon").decode(), "Digest x", "alice-secret-0001"]


@pytest.mark.parametrize("auth", WRONG)
def test_missing_or_wrong_credentials_are_401(server: StandaloneServer, task_id: int, auth: str | None) -> None:
    client = Client(server.url, auth)
    for method, path in PRIVATE:
        body = {"input": "fox", "appId": "app", "numberOfImages": 1} if method == "POST" else None
        reply = client.request(method, path.format(id=task_id), body)
        assert reply.status == 401, (method, path, reply)
        assert "authentication required" in reply.message and "Basic" in reply.headers["www-authenticate"]
    if auth is not None:  # public pages still refuse credentials that are wrong
        assert client.get("is_available").status == 401
    assert Client(server.url, basic(*ALICE)).get(f"task/{task_id}").data["task"]["status"] == 3


def test_bearer_tokens_and_basic_auth_name_their_user(server: StandaloneServer) -> None:
    for auth, user in [(f"Bearer {ALICE[1]}", "alice"), (basic(*BOB), "bob"), (f"bearer  {BOB[1]} ", "bob")]:
        reply = Client(server.url, auth).schedule(**QUICK)
        assert reply.status == 200 and reply.data["task"]["userId"] == user


def test_another_users_task_is_404_and_untouched(server: StandaloneServer, task_id: int) -> None:
    bob = Client(server.url, basic(*BOB))
    for method, path in PRIVATE[:3]:
        reply = bob.request(method, path.format(id=task_id))
        assert reply.status == 404 and reply.message == "Task not found", (method, path, reply)
    assert bob.get("tasks/app/app").data == {"tasks": []}
    assert server.manager.get_task(task_id).status == TaskStatus.SUCCESSFUL
    assert server.manager.store.image_path(task_id, 0).is_file()


@pytest.mark.parametrize("index", ["1", "12", "-1", "999999999999"])
def test_image_index_out_of_range_is_404(server: StandaloneServer, task_id: int, index: str) -> None:
    reply = Client(server.url, basic(*ALICE)).get(f"task/{task_id}/image/{index}")
    assert reply.status == 404 and reply.message == "Image not found"


def test_images_of_unfinished_tasks_are_404(server: StandaloneServer) -> None:
    alice = Client(server.url, basic(*ALICE))
    task_id = alice.schedule(n=4, steps=100).data["task"]["id"]
    assert alice.get(f"task/{task_id}/image/0").message == "Image not found"
    alice.delete(f"task/{task_id}")


@pytest.mark.parametrize("path, message", [
    ("task/..%2Fx", "task id '../x' is not a whole number"),
    ("task/..%2F..%2Fetc%2Fpasswd", "task id '../../etc/passwd' is not a whole number"),
    ("task/1%00", "task id '1\\x00' is not a whole number"),
    ("task/1.0", "task id '1.0' is not a whole number"),
    ("task/{id}/image/..%2F0", "image index '../0' is not a whole number"),
    ("tasks/app/..%2Fx", "appId '../x' is not allowed"),
    ("tasks/app/..", "appId '..' is not allowed"),
    ("task/../x", "no such endpoint"),
    ("task/%ff", "not valid UTF-8"),
])
def test_path_like_ids_are_refused(server: StandaloneServer, task_id: int, path: str, message: str) -> None:
    reply = Client(server.url, basic(*ALICE)).get(path.format(id=task_id))
    assert reply.status in (400, 404) and message in reply.message, reply
    assert reply.status == 400 or "no such endpoint" in message


def test_a_10_mb_body_is_413_and_the_service_carries_on(server: StandaloneServer) -> None:
    alice = Client(server.url, basic(*ALICE))
    huge = b'{"input": "' + b"x" * (10 * 1024 * 1024) + b'", "appId": "app"}'
    reply = alice.post("schedule", huge, headers={"Content-Type": "application/json"})
    assert reply.status == 413 and f"at most {MAX_BODY_BYTES}" in reply.message
    assert alice.post("schedule", b"x" * (MAX_BODY_BYTES + 1)).status == 413
    assert alice.get("is_available").data == {"isAvailable": True}
    assert server.manager.store.find() == []


@pytest.mark.parametrize("body, headers, status, words", [
    (b"{not json", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 400, "must be a JSON object"),
    (b"\xff\xfe", {"Content-Type": "application/json"}, 400, "not valid JSON"),
    (b"input=x", {"Content-Type": "text/plain"}, 415, "'text/plain' is not supported"),
    (b"input=a&input=b&appId=x", {"Content-Type": "application/x-www-form-urlencoded"}, 400, "more than once"),
    (b'{"input": "x"}', {"Content-Type": "application/json", "Content-Length": "ten"}, 400, "Content-Length"),
    (b'{"appId": "x"}', {"Content-Type": "application/json"}, 400, "'input' is missing"),
])
def test_malformed_bodies(server: StandaloneServer, body: bytes, headers: dict[str, str], status: int,
                          words: str) -> None:
    reply = Client(server.url, basic(*ALICE)).post("schedule", body, headers=headers)
    assert reply.status == status and words in reply.message, reply


def test_100_concurrent_schedules_accept_exactly_the_limit(server: StandaloneServer) -> None:
    barrier = threading.Barrier(100)
    replies: list[Reply] = []

    def one(i: int) -> None:
        client = Client(server.url, basic(*ALICE))
        barrier.wait()
        replies.append(client.schedule(f"fox {i}", identifier=str(i), **QUICK))
        client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = Counter(r.status for r in replies)
    assert statuses == Counter({200: 20, 429: 80}), statuses
    limited = next(r for r in replies if r.status == 429)
    assert "at most 20 per 120 s" in limited.message and int(limited.headers["retry-after"]) >= 1
    accepted = sorted(r.data["task"]["identifier"] for r in replies if r.status == 200)
    stored = server.manager.get_user_tasks_by_app("alice", "app")
    assert sorted(t.identifier for t in stored) == accepted and len({t.id for t in stored}) == 20
    assert Client(server.url, basic(*BOB)).schedule(**QUICK).status == 200  # the limit is per user
    wait_until(lambda: all(t.status == TaskStatus.SUCCESSFUL for t in server.manager.store.find()), 60,
               what="the accepted tasks")


def test_the_rate_limit_is_a_sliding_window() -> None:
    now = [0.0]
    limiter = RateLimiter(3, 10, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0]
    assert limiter.acquire("a") == pytest.approx(10) and limiter.acquire("b") == 0
    now[0] = 9.5
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] = 10.0  # the first three have left the window
    assert [limiter.acquire("a") for _ in range(3)] == [0, 0, 0] and limiter.acquire("a") == pytest.approx(10)
    assert RateLimiter(0, 10).acquire("a") == 0  # 0 turns it off


@pytest.mark.parametrize("users, words", [
    ("alice", "entry 1 is not 'user:secret'"),
    ("alice:short", "is 5 characters long; use at least 16"),
    ("alice:only-12-chars", "is 13 characters long; use at least 16"),
    ("alice:long-enough-secret,alice:other-secret-value", "appears twice"),
    ("alice:same-secret-value,bob:same-secret-value", "same secret as another user"),
    ("../x:long-enough-secret", "entry 1 is not"),
])
def test_bad_user_settings_are_refused_without_echoing_secrets(users: str, words: str) -> None:
    with pytest.raises(T2IError, match=words) as raised:
        Credentials.parse(users)
    assert "long-enough-secret" not in str(raised.value) and "same-secret-value" not in str(raised.value)


def test_without_users_a_local_token_is_made_once_and_kept_private(tmp_path: Path) -> None:
    creds, path = Credentials.local(tmp_path)
    assert list(creds.users) == ["local"] and stat.S_IMODE(path.stat().st_mode) == 0o600
    again, _ = Credentials.local(tmp_path)
    assert again.users == creds.users
    token = creds.users["local"]
    assert again.authenticate(f"Bearer {token}") == "local" and again.authenticate(basic("local", token)) == "local"
    assert again.authenticate(basic("local", token + "x")) is None


FORM = "input=a+fox&appId=evil&numberOfImages=1&steps=1"
FORM_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize("headers, why", [
    ({"Origin": "http://evil.example"}, "Origin 'http://evil.example'"),
    ({"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}, "Sec-Fetch-Site: 'cross-site'"),
    ({"Origin": "null"}, "Origin 'null'"),
    ({"Sec-Fetch-Site": "same-site"}, "Sec-Fetch-Site: 'same-site'"),
    ({}, "saved basic-auth credentials"),  # a browser old enough to send neither header
])
def test_a_cross_site_form_post_with_saved_basic_credentials_is_403(server: StandaloneServer, headers: dict[str, str],
                                                                    why: str) -> None:
    # Every 401 invites the browser's own basic-auth dialog; once a user filled it in, the browser sent those
    # credentials with a plain form POST from any other site, which scheduled tasks as that user.
    browser = Client(server.url, basic(*ALICE), ocs_header=False)
    reply = browser.post("schedule", FORM, headers={**FORM_TYPE, **headers})
    assert reply.status == 403 and reply.json["ocs"]["meta"]["statuscode"] == 403, reply
    assert reply.data == {"message": reply.message} and "www-authenticate" not in reply.headers
    assert reply.message.startswith("cross-site request refused: ") and why in reply.message, reply.message
    assert "OCS-APIRequest: true" in reply.message
    assert server.manager.store.find() == []


def test_a_cross_site_delete_is_403_and_the_task_stays(server: StandaloneServer, task_id: int) -> None:
    browser = Client(server.url, basic(*ALICE), ocs_header=False)
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    reply = browser.delete(f"task/{task_id}", headers=evil)
    assert reply.status == 403 and "cross-site request refused" in reply.message, reply
    assert server.manager.get_task(task_id).status == TaskStatus.SUCCESSFUL


def test_same_origin_pages_and_scripts_still_change_tasks(server: StandaloneServer) -> None:
    own = f"http://{urlsplit(server.url).netloc}"
    cases = [
        (basic(*ALICE), {"Origin": own, "Sec-Fetch-Site": "same-origin"}),  # the service's own page
        (basic(*ALICE), {"Origin": own}),  # a browser without Sec-Fetch-Site
        (basic(*ALICE), {"OCS-APIRequest": "true"}),  # curl -u alice:… -H 'OCS-APIRequest: true'
        (f"Bearer {ALICE[1]}", {}),  # curl -H 'Authorization: Bearer …': no browser sends that by itself
    ]
    for i, (auth, headers) in enumerate(cases):
        client = Client(server.url, auth, ocs_header=False)
        reply = client.post("schedule", f"{FORM}&identifier={i}", headers={**FORM_TYPE, **headers})
        assert reply.status == 200 and reply.data["task"]["identifier"] == str(i), (headers, reply)
        client.close()
    assert len(server.manager.store.find()) == len(cases)
