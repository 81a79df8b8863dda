"""1,000 generated bad requests to /schedule (property-based): each gets a 4xx whose message names the bad field,
the service stays up, and the store stays consistent and empty.

Each generated request has exactly one bad part (one field, an unknown key, or the whole body) next to valid,
often unicode, values, so the message can be checked for the field's name. Only validation paths run: no image is
made, which keeps 1,000 examples to seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from standalone_helpers import ALICE, USERS, Client, basic, load_service

from backend.config import Settings
from backend.standalone.server import StandaloneServer

SCHEDULERS = ("euler", "dpm++2m", "dpm++2m-karras", "ddim")
#: Words the message must contain when this field alone is bad.
NAMES = {
    "input": ("prompt", "input"), "appId": ("appId",), "identifier": ("identifier",),
    "numberOfImages": ("number of images", "numberOfImages"), "size": ("size", "width", "height"),
    "steps": ("steps",), "guidance": ("guidance",), "negative_prompt": ("negative prompt",), "seed": ("seed",),
    "scheduler": ("scheduler",),
}


def _whole_in(text: str, low: int, high: int) -> bool:
    try:
        return low <= int(text) <= high
    except ValueError:
        return False


def _number_in(text: str, low: float, high: float) -> bool:
    try:
        return low <= float(text) <= high
    except ValueError:
        return False


def _long(minimum: int) -> st.SearchStrategy[str]:
    """Text just over a limit, from one repeated character (building 4,000 random ones is slow)."""
    return st.builds(lambda c, extra: c * (minimum + extra), st.characters(), st.integers(0, 3000))


junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                 st.text(max_size=30), st.lists(st.integers(), max_size=3),
                 st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
not_text = junk.filter(lambda v: not isinstance(v, str))
# Built rather than filtered: filtering collections for truthiness trips an internal check in hypothesis.
truthy_not_text = st.one_of(st.integers().filter(bool), st.floats().filter(lambda v: v != 0), st.just(True),
                            st.lists(st.integers(), min_size=1, max_size=3),
                            st.dictionaries(st.text(max_size=5), st.integers(), min_size=1, max_size=2))
prompt = st.text(min_size=1, max_size=300).filter(str.strip)


def _bad_whole(low: int, high: int, none_ok: bool) -> st.SearchStrategy[Any]:
    def bad(v: Any) -> bool:
        if v is None:
            return not none_ok
        if isinstance(v, bool):
            return True
        if isinstance(v, int):
            return not low <= v <= high
        if isinstance(v, float):
            return not (math.isfinite(v) and v.is_integer() and low <= v <= high)
        if isinstance(v, str):
            return not (v.strip().lstrip("-").isdigit() and _whole_in(v, low, high))
        return True

    return st.one_of(junk, st.integers(), st.floats(), st.text(max_size=8)).filter(bad)


def _bad_guidance(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        return True
    if isinstance(v, str):
        return not _number_in(v, 0, 30)
    if isinstance(v, int):  # may be too large for a float
        return not 0 <= v <= 30
    return not (math.isfinite(v) and 0 <= v <= 30)


BAD = {
    "input": st.one_of(not_text, st.text(" \t\n\u3000\u00a0", max_size=5), _long(4001)),
    "appId": st.one_of(not_text, st.text(max_size=70).filter(lambda s: not _app_ok(s)), _long(65)),
    "identifier": st.one_of(not_text, _long(256)),
    "numberOfImages": _bad_whole(1, 12, none_ok=False),
    "size": st.one_of(truthy_not_text, st.just(0), st.just(False),
                      st.text(max_size=12).filter(lambda s: s != "" and not _size_ok(s)),
                      st.tuples(st.integers(0, 5000), st.integers(0, 5000)).map(lambda t: f"{t[0]}x{t[1]}")
                      .filter(lambda s: not _size_ok(s))),
    "steps": _bad_whole(1, 100, none_ok=True),
    "guidance": st.one_of(junk, st.floats(), st.text(max_size=8)).filter(_bad_guidance),
    "negative_prompt": st.one_of(truthy_not_text, _long(4001)),
    "seed": _bad_whole(0, 2**63 - 1, none_ok=True),
    "scheduler": st.one_of(junk, st.text(max_size=20)).filter(lambda v: bool(v) and v not in SCHEDULERS),
}


def _app_ok(text: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", text) is not None


def _size_ok(text: str) -> bool:
    from runtime.errors import T2IError
    from runtime.validation import parse_size

    try:
        parse_size(text)
    except T2IError:
        return False
    return True


@st.composite
def one_bad_field(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"input": draw(prompt), "appId": draw(st.sampled_from(["app", "my.app-2", "x@y"])),
                            "numberOfImages": draw(st.integers(1, 12))}
    for key, value in [("identifier", st.text(max_size=40)), ("steps", st.integers(1, 100)),
                       ("guidance", st.floats(0, 30)), ("negative_prompt", st.text(max_size=50)),
                       ("seed", st.integers(0, 2**63 - 1)), ("scheduler", st.sampled_from(SCHEDULERS)),
                       ("size", st.sampled_from(["256x256", "512x384", "1024x1024"]))]:
        if draw(st.booleans()):
            body[key] = draw(value)
    field = draw(st.sampled_from([*sorted(BAD), "unknown key"]))
    if field == "unknown key":
        body[draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in NAMES and k != "format"))] = 1
    else:
        body[field] = draw(BAD[field])
        if body[field] is None and field in ("input", "appId"):
            del body[field]  # null and absent are both "missing"
    return field, body


raw_bodies = st.one_of(
    st.tuples(st.just("application/json"),
              st.one_of(st.binary(max_size=64), junk.map(lambda v: json.dumps(v).encode()))),
    st.tuples(st.just("application/x-www-form-urlencoded"), st.binary(max_size=64)),
    st.tuples(st.sampled_from(["text/plain", "multipart/form-data", "application/xml"]), st.binary(max_size=16)),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, onnx_bundle: Path) -> Iterator[StandaloneServer]:
    data = tmp_path_factory.mktemp("fuzz")
    srv = StandaloneServer(Settings().updated(data_dir=data, users=USERS, port=0, threads=1),
                           services=[load_service(onnx_bundle)])
    srv.start()
    yield srv
    srv.close()


def test_1000_bad_requests_each_get_a_clear_4xx(server: StandaloneServer) -> None:
    client = Client(server.url, basic(*ALICE))
    seen: dict[int, int] = {}

    # Derandomized: the same 1,000 cases on every run, so CI cannot turn red by chance; a case found by another
    # seed joins the explicit examples.
    @settings(max_examples=1000, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(st.one_of(one_bad_field(), st.tuples(st.just("body"), raw_bodies)))
    # A control character after the digits: stripped for the digit check, it made int() fail with a 500.
    @example(("numberOfImages", {"input": "a fox", "appId": "app", "numberOfImages": "0\x1f"}))
    @example(("steps", {"input": "a fox", "appId": "app", "numberOfImages": 1, "steps": "5\x1c"}))
    @example(("seed", {"input": "a fox", "appId": "app", "numberOfImages": 1, "seed": "\x1d7"}))
    # A good seed that is too large for its number of images must not hide the bad field.
    @example(("scheduler", {"input": "a fox", "appId": "app", "numberOfImages": 11, "seed": 2**63 - 10,
                            "scheduler": "nope"}))
    def check(case: tuple[str, Any]) -> None:
        field, payload = case
        if field == "body":
            kind, body = payload
            reply = client.post("schedule", body, headers={"Content-Type": kind})
        else:
            reply = client.post("schedule", payload)
        seen[reply.status] = seen.get(reply.status, 0) + 1
        assert 400 <= reply.status < 500, (case, reply)
        message = reply.message
        assert message and reply.data == {"message": message} and len(message) <= 1000, reply
        assert "Traceback" not in message and "internal error" not in message
        if field == "unknown key":
            assert "unknown input" in message, (case, message)
        elif field != "body":
            assert any(word in message for word in NAMES[field]), (case, message)

    check()
    print(f"\nanswers to the generated bad requests: {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1000
    assert client.get("is_available").data == {"isAvailable": True}
    assert server.manager.store.find() == [] and server.manager.store.check() == []
    ok = client.schedule("a red fox", "app", 1, steps=1)  # and it still works
    assert ok.status == 200 and ok.data["task"]["status"] == 1
