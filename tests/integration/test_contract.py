"""Contract tests: every server behaviour the fake Nextcloud imitates and a unit test relies on, sent as the same
requests to the fake and to the real Nextcloud 32.0.1 + AppAPI 32.0.0; the answers (status, JSON shape, stored
values) must agree. File ids and timestamps differ by nature and are compared by shape."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from contract_sides import FakeSide, RealSide, Side, StandInExApp, shape
from fake_appapi import APP_ID
from fake_nextcloud import FakeNextcloud
from real_nextcloud import RealNextcloud, SharedApp

AA = "/ocs/v1.php/apps/app_api/api/v1"
TP = "/ocs/v2.php/taskprocessing/tasks_provider"
P1, P2 = "contract_p1", "contract_p2"
NEXT = {"providerIds": [P1, P2], "taskTypeIds": ["core:text2image"]}


def _provider(pid: str) -> dict:
    return {"id": pid, "name": pid, "task_type": "core:text2image", "expected_runtime": 10,
            "optional_input_shape": [{"name": "size", "description": "size", "shape_type": 6},
                                     {"name": "seed", "description": "seed", "shape_type": 0},
                                     {"name": "negative_prompt", "description": "no", "shape_type": 1}],
            "optional_output_shape": [], "input_shape_enum_values": [], "input_shape_defaults": [],
            "optional_input_shape_enum_values": {"size": [{"name": "512x512", "value": "512x512"},
                                                          {"name": "1024x1024", "value": "1024x1024"}]},
            "optional_input_shape_defaults": {"size": "512x512", "seed": 42}, "output_shape_enum_values": [],
            "optional_output_shape_enum_values": []}


@pytest.fixture(scope="module")
def sides(nextcloud: RealNextcloud, shared: SharedApp) -> Iterator[tuple[Side, Side]]:
    shared.release()  # the app id is the contract's now, registered against a stand-in
    stand_in, fake = StandInExApp(), FakeNextcloud(version=32).start()
    nextcloud.register(stand_in)
    pair: tuple[Side, Side] = (FakeSide(fake), RealSide(nextcloud))
    try:
        for side in pair:
            for pid in (P1, P2):
                assert side.app("POST", f"{AA}/ai_provider/task_processing", {"provider": _provider(pid)})[0] == 200
            side.set_preference(P1)
        yield pair
    finally:
        pair[1].clean()  # type: ignore[attr-defined]
        nextcloud.unregister()
        stand_in.stop()
        fake.stop()


def agree(sides: tuple[Side, Side], run: Callable[[Side], Any]) -> Any:
    """Run the same steps on both sides; their records must be equal."""
    fake, real = (run(s) for s in sides)
    assert fake == real, f"\nfake: {fake}\nreal: {real}"
    return real


def _ocs(answer: Any) -> Any:
    """An OCS answer as compared: its statuscode and the shape of its data; other bodies by shape."""
    if isinstance(answer, dict) and "ocs" in answer:
        return answer["ocs"]["meta"]["statuscode"], shape(answer["ocs"]["data"])
    return shape(answer)


def _next(side: Side, body: Any = NEXT) -> tuple[int, Any]:
    return side.app("GET", f"{TP}/next", body)


def _handed(side: Side, task_input: dict | None = None) -> int:
    status, tid = side.schedule(task_input or {"input": "a fox", "numberOfImages": 1})
    assert status == 200, tid
    status, answer = _next(side)
    assert status == 200 and answer["ocs"]["data"]["task"]["id"] == tid, (side.name, status, answer)
    return tid


def test_provider_registration(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        broken = {k: v for k, v in _provider("contract_p3").items() if k != "optional_input_shape_defaults"}
        bad = side.app("POST", f"{AA}/ai_provider/task_processing", {"provider": broken})
        got = side.app("GET", f"{AA}/ai_provider/task_processing?name={P1}")
        unknown = side.app("GET", f"{AA}/ai_provider/task_processing?name=nobody")
        return [(bad[0], _ocs(bad[1])[0]), got[0], _ocs(got[1]), got[1]["ocs"]["data"]["name"], unknown[0],
                _ocs(unknown[1])[0]]

    agree(sides, run)


def test_scheduling_checks_types_not_ranges(sides: tuple[Side, Side]) -> None:
    inputs = [{"numberOfImages": 0}, {"numberOfImages": -1}, {"numberOfImages": 13}, {"numberOfImages": 1.5},
              {"numberOfImages": "3"}, {"numberOfImages": 1, "input": ""}, {"numberOfImages": 1, "foo": 1},
              {"numberOfImages": 1, "seed": "123"}, {"numberOfImages": 1, "size": "1024x1024"},
              {"numberOfImages": 1, "negative_prompt": None, "size": None},
              {"numberOfImages": "x"}, {"numberOfImages": True}, {"numberOfImages": None}, {"input": 123,
              "numberOfImages": 1}, {"numberOfImages": 1, "seed": "abc"}, {"numberOfImages": 1, "size": 5},
              {"numberOfImages": 1, "size": "300x300"}, {"numberOfImages": 1, "negative_prompt": 5}]

    def run(side: Side) -> list:
        out = []
        for extra in inputs:
            status, found = side.schedule({"input": "a fox", **extra})
            if status == 200:
                out.append((status, side.task(found)["input"], side.task(found)["progress"]))
                side.cancel(found)
            else:
                out.append((status, found))
        return out

    agree(sides, run)


def test_next_hands_the_oldest_task_of_the_preferred_provider_once(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        tid = side.schedule({"input": "a fox", "numberOfImages": 2, "seed": 7})[1]
        none = [_next(side, body)[0] for body in ({"providerIds": [P2], "taskTypeIds": ["core:text2image"]},
                                                  {"providerIds": [P1], "taskTypeIds": ["other:type"]},
                                                  {"providerIds": [], "taskTypeIds": ["core:text2image"]},
                                                  {"providerIds": ["nobody"], "taskTypeIds": ["core:text2image"]})]
        handed_status, handed = _next(side)
        task = handed["ocs"]["data"]["task"]
        again = _next(side)[0]
        batch = side.app("GET", f"{TP}/next_batch", NEXT)[0]
        side.cancel(tid)
        return [none, handed_status, sorted(task), task["status"], task["progress"], task["startedAt"],
                task["input"], handed["ocs"]["data"]["provider"], again, batch, _ocs(handed)]

    agree(sides, run)


def test_progress_cancel_upload_and_ignored_results(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        tid = _handed(side)
        out: list = []
        for value in (0.5, 1.5, -1, "x", None, "0.25", True):
            status, answer = side.app("POST", f"{TP}/{tid}/progress", {"taskId": tid, "progress": value})
            out.append((value, status, _ocs(answer), side.task(tid)["progress"], side.task(tid)["status"]))
        side.cancel(tid)
        cancelled = side.app("POST", f"{TP}/{tid}/progress", {"taskId": tid, "progress": 0.6})
        upload = side.app("POST", f"{TP}/{tid}/file", file=b"\x89PNG not really")
        result = side.app("POST", f"{TP}/{tid}/result", {"taskId": tid, "output": {"images": [
            upload[1]["ocs"]["data"]["fileId"]]}})
        task = side.task(tid)
        unknown = side.app("POST", f"{TP}/99999/progress", {"taskId": 99999, "progress": 0.5})
        return [out, cancelled[0], cancelled[1]["ocs"]["data"]["task"]["status"], _ocs(cancelled[1]), upload[0],
                _ocs(upload[1]), result[0], task["status"], task["output"], task["progress"], unknown[0],
                _ocs(unknown[1])]

    agree(sides, run)


def test_results(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        out: list = []
        good = _handed(side)
        fid = side.app("POST", f"{TP}/{good}/file", file=b"png")[1]["ocs"]["data"]["fileId"]
        answer = side.app("POST", f"{TP}/{good}/result", {"taskId": good, "output": {"images": [fid], "extra": 1}})
        task = side.task(good)
        out.append((answer[0], _ocs(answer[1]), task["status"], task["output"] == {"images": [fid]},
                    task["progress"], task["endedAt"] is not None))
        for output, error, user_error in (({"images": [999999]}, None, None), ({}, None, None),
                                          (None, "e" * 5000, None), (None, "", None),
                                          (None, "for the admin", "for the user"), (None, None, "for the user")):
            tid = _handed(side)
            body = {"taskId": tid, "output": output, "errorMessage": error}
            if user_error is not None:
                body["userFacingErrorMessage"] = user_error
            if user_error is not None and error is None:
                del body["errorMessage"]
                del body["output"]
            status, answer = side.app("POST", f"{TP}/{tid}/result", body)
            task = side.task(tid)
            out.append((status, _ocs(answer), task["status"], task["progress"], len(side.error(tid)),
                        side.error(tid)[:60]))
            side.cancel(tid)
        return out

    agree(sides, run)


def test_auth_failures(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        return [(s, a) for s, a in (
            side.app("GET", f"{TP}/next", NEXT, secret="wrong"),
            side.app("GET", f"{TP}/next", NEXT, headers={"EX-APP-ID": "nobody"}),
            side.app("GET", f"{TP}/next", NEXT, headers={"OCS-APIRequest": None}),
            side.app("POST", f"{TP}/1/progress", {"progress": 0.5}, secret="wrong"),
        )] + [(s, _ocs(a)) for s, a in (
            side.app("GET", f"{AA}/ai_provider/task_processing?name={P1}", secret="wrong"),
            side.app("GET", "/ocs/v1.php/apps/app_api/ex-app/state", headers={"EX-APP-VERSION": None}),
            side.app("GET", "/ocs/v1.php/apps/app_api/ex-app/state"),
            side.app("POST", f"{AA}/log", {"level": 2, "message": "contract test"}),
        )]

    agree(sides, run)


def test_app_config(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        out = []
        for value in ("v1", "", "v2"):
            status, answer = side.app("POST", f"{AA}/ex-app/config", {"configKey": "contract_key",
                                                                       "configValue": value})
            out.append((status, _ocs(answer)[0], side.config().get("contract_key")))
        got = side.app("POST", f"{AA}/ex-app/config/get-values", {"configKeys": ["contract_key", "absent"]})
        out.append((got[0], [(r["configkey"], r["configvalue"]) for r in got[1]["ocs"]["data"]]))
        for _ in range(2):
            status, answer = side.app("DELETE", f"{AA}/ex-app/config", {"configKeys": ["contract_key"]})
            out.append((status, _ocs(answer)[0], "contract_key" in side.config()))
        return out

    agree(sides, run)


FIELDS = [{"id": "contract_text", "title": "Text", "type": "text", "default": "d"},
          {"id": "contract_check", "title": "Check", "type": "checkbox", "default": False, "label": "on"},
          {"id": "contract_num", "title": "Number", "type": "number", "default": 25},
          {"id": "contract_sel", "title": "Select", "type": "select", "default": "a (first)",
           "options": ["a (first)", "b"]}]


def _form(form_id: str, fields: list[dict]) -> dict:
    return {"id": form_id, "priority": 10, "section_type": "admin", "section_id": "ai", "title": "Contract",
            "description": "", "doc_url": "", "fields": [{"description": "", "options": [], "placeholder": "",
                                                          "label": "", "notify": False, "sensitive": False, **f}
                                                         for f in fields]}


def test_the_settings_page(sides: tuple[Side, Side]) -> None:
    prefixed = f"{APP_ID}_prefixed"  # the page sends "prefixed", a form AppAPI does not have

    def run(side: Side) -> list:
        out: list = []
        for form in (_form("contract", FIELDS), _form(prefixed, [{"id": "contract_prefixed", "title": "P",
                                                                  "type": "text", "default": ""}])):
            status, answer = side.app("POST", f"{AA}/ui/settings", {"formScheme": form})
            out.append((status, _ocs(answer)[0]))
        status, answer = side.user("GET", "/ocs/v2.php/settings/api/declarative/forms")
        mine = {f["id"]: {x["id"]: x.get("value") for x in f["fields"]} for f in answer["ocs"]["data"]
                if f.get("app") == APP_ID}
        out.append((status, mine))
        for field, value in (("contract_text", "hello"), ("contract_check", 1), ("contract_check", 0),
                             ("contract_check", False), ("contract_check", True), ("contract_num", "30"),
                             ("contract_num", 7.5), ("contract_num", ""), ("contract_sel", "b"),
                             ("contract_prefixed", "x"), ("nobody", "x")):
            form_id = "prefixed" if field == "contract_prefixed" else "contract"  # form.id.replace(app + '_', '')
            status, answer = side.user("POST", "/ocs/v2.php/settings/api/declarative/value", {
                "app": APP_ID, "formId": form_id, "fieldId": field, "value": value})
            out.append((field, value, status, side.config().get(field)))
        status, answer = side.user("GET", "/ocs/v2.php/settings/api/declarative/forms")
        out.append({f["id"]: {x["id"]: x.get("value") for x in f["fields"]} for f in answer["ocs"]["data"]
                    if f.get("app") == APP_ID})
        for form_id in ("contract", prefixed, "contract"):
            status, answer = side.app("DELETE", f"{AA}/ui/settings?formId={form_id}")
            out.append((status, _ocs(answer)[0]))
        side.app("DELETE", f"{AA}/ex-app/config", {"configKeys": [f["id"] for f in FIELDS]})
        return out

    agree(sides, run)


def test_disabled_then_unknown_app(sides: tuple[Side, Side]) -> None:
    def run(side: Side) -> list:
        tid = side.schedule({"input": "a fox", "numberOfImages": 1})[1]
        side.set_app("disabled")
        disabled = [side.app("GET", "/ocs/v1.php/apps/app_api/ex-app/state"), _next(side),
                    side.app("GET", f"{AA}/ai_provider/task_processing?name={P1}"),
                    side.app("POST", f"{TP}/{tid}/progress", {"taskId": tid, "progress": 0.5})]
        side.set_app("enabled")
        provider = side.app("GET", f"{AA}/ai_provider/task_processing?name={P1}")
        side.cancel(tid)
        side.set_app("unknown")
        unknown = [side.app("GET", "/ocs/v1.php/apps/app_api/ex-app/state"), _next(side)]
        return [(s, _ocs(a)) for s, a in (*disabled, provider, *unknown)]

    agree(sides, run)
