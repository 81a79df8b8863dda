"""The admin settings page on a real Nextcloud 32.0.1: each change saved exactly as the page saves it (``formId`` is
the form's id without the ``<appid>_`` prefix; a checkbox as 1/0, a select as its option's text, a number as the
input's text), and the next task showing it; then the way back to the deploy-time values."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fake_appapi import APP_ID, ExAppProcess
from PIL import Image
from real_nextcloud import PROVIDER, RealNextcloud, wait_for

from backend.nextcloud.admin_settings import FORM_ID, model_key

JOB = {"input": "a red fox", "numberOfImages": 1, "seed": 7}


def _run(nc: RealNextcloud, proc: ExAppProcess) -> tuple[dict, Image.Image]:
    [task] = nc.wait([nc.schedule(JOB)])
    assert task["status"] == "STATUS_SUCCESSFUL", proc.output()[-3000:]
    return task, Image.open(io.BytesIO(nc.file(task["id"], task["output"]["images"][0])))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _applied(proc: ExAppProcess) -> str:
    lines = [x for x in proc.output().splitlines() if "admin settings applied" in x]
    return lines[-1] if lines else ""


def _defaults(nc: RealNextcloud) -> dict:
    answer = nc.ocs("GET", "/ocs/v2.php/taskprocessing/tasktypes")[1]
    return answer["ocs"]["data"]["types"]["core:text2image"]["optionalInputShapeDefaults"]


def _save(nc: RealNextcloud, field: str, value: object) -> None:
    status, answer = nc.page_save(field, value)
    assert status == 200, (field, status, answer)


def test_the_page_saves_each_field_and_the_next_task_shows_it(nextcloud: RealNextcloud, app: ExAppProcess,
                                                              tiny_onnx: Path, tiny_two: Path) -> None:
    nc, key = nextcloud, model_key(str(tiny_onnx))
    forms = nc.forms()
    assert list(forms) == [FORM_ID] and not FORM_ID.startswith(f"{APP_ID}_"), list(forms)
    _, base = _run(nc, app)
    assert base.size == (256, 256) and base.text["steps"] == "25"

    # Per-model defaults: a number as the input's text, a select as its option's text.
    _save(nc, f"{key}_steps", "3")
    _save(nc, f"{key}_size", "256x384 (portrait 2:3)")
    assert {k: nc.app_config().get(k) for k in (f"{key}_steps", f"{key}_size")} == {
        f"{key}_steps": "3", f"{key}_size": "256x384 (portrait 2:3)"}, "the page's save was stored"
    wait_for(lambda: _defaults(nc).get("steps") == 3 and _defaults(nc).get("size") == "256x384", 30, app)
    _, plain = _run(nc, app)
    assert plain.size == (256, 384) and plain.text["steps"] == "3"

    # A checkbox as 1.
    _save(nc, "watermark", 1)
    assert nc.app_config()["watermark"] == "1"
    wait_for(lambda: "watermark True" in _applied(app), 30, app)
    _, marked = _run(nc, app)
    a, b = _pixels(plain), _pixels(marked)
    h, w = a.shape[:2]
    assert np.abs(a[h - h // 8:, : w // 2] - b[h - h // 8:, : w // 2]).mean() > 10, "a visible mark"
    assert np.array_equal(a[: h // 2], b[: h // 2]), "the rest of the image is untouched"

    # A select as its option's text: the decoder, loaded between tasks.
    _save(nc, "decoder", "taesd")
    wait_for(lambda: "taesd decoder" in _applied(app), 60, app)
    _, taesd = _run(nc, app)
    assert np.abs(_pixels(taesd)[: h // 2] - b[: h // 2]).mean() > 1, "another decoder, other pixels"

    # The model list (a text field): the next task runs on the new model.
    _save(nc, "model", str(tiny_two))
    two = f"{APP_ID}:tiny-two"
    wait_for(lambda: nc.providers() == [two], 60, app)
    task, _ = _run(nc, app)
    assert f"{two}#0: task {task['id']} taken" in app.output()

    # The way back: an empty field and the "deploy default" option mean the T2I_* values again.
    [decoder] = [f for f in forms[FORM_ID]["fields"] if f["id"] == "decoder"]
    assert decoder["options"][0] == decoder["value"] == "deploy default (vae)", decoder
    for field, value in (("model", ""), ("decoder", decoder["options"][0]), ("watermark", 0)):
        _save(nc, field, value)
    wait_for(lambda: nc.providers() == [PROVIDER], 60, app)  # the form shows this model's fields again
    wait_for(lambda: any(f["id"] == f"{key}_steps" for f in nc.forms()[FORM_ID]["fields"]), 30, app)
    _save(nc, f"{key}_steps", "")
    _save(nc, f"{key}_size", "256x256 (square, native)")
    wait_for(lambda: _defaults(nc).get("steps") == 25 and _defaults(nc).get("size") == "256x256", 60, app)
    wait_for(lambda: "vae decoder" in _applied(app) and "watermark False" in _applied(app), 30, app)
    _, again = _run(nc, app)
    assert np.array_equal(_pixels(again), _pixels(base)), "back to the deploy-time settings"
    shown = {f["id"]: f["value"] for f in nc.forms()[FORM_ID]["fields"]}
    assert shown["model"] == "" and shown["watermark"] in ("0", 0), shown
