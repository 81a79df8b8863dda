"""Tasks on a real Nextcloud 32.0.1: registration, a round trip with every optional input, bad inputs, cancel and
disable mid-task. One registered ExApp (the tiny model) serves these cases; each leaves it enabled."""

from __future__ import annotations

import io
import time

import pytest
from fake_appapi import ExAppProcess
from fake_nextcloud import ScheduleError
from PIL import Image
from real_nextcloud import PROVIDER, RealNextcloud, SharedApp, wait_for


def _progress(nc: RealNextcloud, tid: int) -> float:
    return float(nc.task(tid)["progress"] or 0)


def test_register_init_enable(nextcloud: RealNextcloud, shared: SharedApp) -> None:
    proc = shared.get()  # started, then `occ app_api:app:register … --wait-finish` returned 0
    listed = nextcloud.occ("app_api:app:list").stdout
    assert "text2image_sd2" in listed and "enabled" in listed.lower(), listed
    assert nextcloud.providers() == [PROVIDER]
    answer = nextcloud.ocs("GET", "/ocs/v2.php/taskprocessing/tasktypes")[1]
    shape = answer["ocs"]["data"]["types"]["core:text2image"]
    assert set(shape["optionalInputShape"]) == {"size", "steps", "guidance", "negative_prompt", "seed", "scheduler"}
    assert shape["optionalInputShapeDefaults"]["size"] == "256x256"
    assert "enabled by AppAPI" in proc.output()


def test_a_task_with_every_optional_input(nextcloud: RealNextcloud, app: ExAppProcess) -> None:
    job = {"input": "a lighthouse", "numberOfImages": 2, "size": "384x256", "steps": 3, "guidance": 2.5,
           "negative_prompt": "blurry", "seed": 42, "scheduler": "euler"}
    [task] = nextcloud.wait([nextcloud.schedule(job, custom_id="round-trip")])
    assert task["status"] == "STATUS_SUCCESSFUL", app.output()[-3000:]
    assert task["progress"] == 1 and task["customId"] == "round-trip"
    assert task["input"] == job
    images = [Image.open(io.BytesIO(nextcloud.file(task["id"], fid))) for fid in task["output"]["images"]]
    assert [im.size for im in images] == [(384, 256)] * 2
    meta = images[1].text
    assert (meta["seed"], meta["steps"], meta["negative_prompt"], meta["size"]) == ("43", "3", "blurry", "384x256")
    assert meta["AI-generated"] == "true"
    # Defaults filled in by the server (the provider's optional_input_shape_defaults) reach the provider too.
    [plain] = nextcloud.wait([nextcloud.schedule({"input": "a fox", "numberOfImages": 1})])
    assert plain["status"] == "STATUS_SUCCESSFUL" and plain["input"]["size"] == "256x256"


def test_bad_inputs_fail_with_the_reason(nextcloud: RealNextcloud, app: ExAppProcess) -> None:
    with pytest.raises(ScheduleError) as refused:  # the server's own type check
        nextcloud.schedule({"input": "a fox", "numberOfImages": 1, "size": "100x100"})
    assert refused.value.status == 400 and 'Got "100x100"' in refused.value.message
    bad = {"number of images 0 is out of range": {"numberOfImages": 0},
           "number of images 13 is out of range": {"numberOfImages": 13},
           "steps 1000 is out of range": {"numberOfImages": 1, "steps": 1000},
           "prompt is 100000 characters long": {"numberOfImages": 1, "input": "x" * 100_000}}
    ids = {why: nextcloud.schedule({"input": "a fox", **extra}) for why, extra in bad.items()}
    good = nextcloud.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})
    done = nextcloud.wait([*ids.values(), good])
    assert [t["status"] for t in done] == ["STATUS_FAILED"] * len(bad) + ["STATUS_SUCCESSFUL"], app.output()[-3000:]
    for why, tid in ids.items():
        stored = nextcloud.error_message(tid)  # Nextcloud 32 shows it to no user; the admin finds it here
        assert why in stored and len(stored) <= 1000, (why, stored)


def test_cancel_mid_task(nextcloud: RealNextcloud, app: ExAppProcess) -> None:
    slow = nextcloud.schedule({"input": "a slow fox", "numberOfImages": 1, "size": "512x512", "steps": 100})
    after = nextcloud.schedule({"input": "next", "numberOfImages": 1, "steps": 2})
    wait_for(lambda: _progress(nextcloud, slow) > 0.02, 60, app)
    cancelled = nextcloud.cancel(slow)
    assert cancelled["status"] == "STATUS_CANCELLED"
    [done] = nextcloud.wait([after], timeout=60)
    assert done["status"] == "STATUS_SUCCESSFUL", app.output()[-3000:]
    task = nextcloud.task(slow)
    assert task["status"] == "STATUS_CANCELLED" and task["output"] is None
    assert _progress(nextcloud, slow) < 0.5, "the worker stopped within a step or two of the cancel"
    assert f"task {slow} cancelled by its user" in app.output()


def test_disable_mid_task_then_enable(nextcloud: RealNextcloud, app: ExAppProcess) -> None:
    tid = nextcloud.schedule({"input": "a fox", "numberOfImages": 1, "size": "1024x1024", "steps": 100})
    wait_for(lambda: _progress(nextcloud, tid) > 0.02, 120, app)
    t0 = time.monotonic()
    nextcloud.occ("app_api:app:disable", "text2image_sd2")
    took = time.monotonic() - t0
    task = nextcloud.task(tid)
    assert task["status"] == "STATUS_FAILED", (task, app.output()[-3000:])  # settled, not left RUNNING
    assert "stopped" in nextcloud.error_message(tid).lower()
    assert took < 40, f"AppAPI waits 60 s for /enabled; disabling took {took:.1f} s"
    assert nextcloud.providers() == []
    nextcloud.occ("app_api:app:enable", "text2image_sd2")
    wait_for(lambda: nextcloud.providers() == [PROVIDER], 60, app)
    [again] = nextcloud.wait([nextcloud.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})])
    assert again["status"] == "STATUS_SUCCESSFUL", app.output()[-3000:]
