"""Issue #12: the admin settings form. The ExApp registers it in the shape Nextcloud 32's declarative settings take;
values saved on the form (the fake stores them as AppAPI does: strings in the app's config) take effect between
tasks: marking and defaults at once, a new model by loading it and re-registering the providers."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from fake_nextcloud import APP_ID, ExAppProcess, FakeNextcloud
from fake_settings_form import form_problem
from PIL import Image

from backend.config import Settings
from backend.nextcloud.admin_settings import FORM_ID, GLOBAL_FIELDS, build_form, choose, model_key
from runtime.request import Defaults


def _wait(what, timeout: float = 60.0, proc: ExAppProcess | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out{': ' + proc.output() if proc else ''}")


@pytest.fixture
def bundles(onnx_bundle: Path, openvino_v_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "tiny-onnx", tmp_path / "tiny-v-ov"
    first.symlink_to(onnx_bundle)
    second.symlink_to(openvino_v_bundle)
    return first, second


def _png(fake: FakeNextcloud, task: dict) -> bytes:
    return fake.files[task["output"]["images"][0]]


def test_the_form_is_registered_and_its_changes_apply_between_tasks(bundles: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    first, second = bundles
    fake = FakeNextcloud(version=32).start()
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": str(first), "T2I_POLL_INTERVAL": "0.2",
                                                     "T2I_THREADS": "1", "T2I_SETTINGS_POLL": "0.3"})
    try:
        assert fake.install(proc)["error"] == "", proc.output()
        form = _wait(lambda: fake.settings_forms.get(FORM_ID), proc=proc)
        assert form["section_type"] == "admin" and form_problem(form) == ""
        key = model_key(str(first))
        ids = [f["id"] for f in form["fields"]]
        assert ids == [*GLOBAL_FIELDS, f"{key}_size", f"{key}_steps", f"{key}_guidance"]
        by_id = {f["id"]: f for f in form["fields"]}
        assert by_id["model"]["default"] == "" and by_id["model"]["placeholder"] == f"deploy default: {first}"
        assert by_id["decoder"]["default"] == "deploy default (vae)" == by_id["decoder"]["options"][0]
        assert by_id["watermark"]["default"] is False and "T2I_WATERMARK=off" in by_id["watermark"]["description"]
        assert by_id[f"{key}_size"]["default"].startswith("256x256")
        assert any(o.startswith("256x384 (portrait") for o in by_id[f"{key}_size"]["options"])

        job = {"input": "a red fox", "numberOfImages": 1, "seed": 7, "steps": 2, "size": "256x256"}
        plain = fake.wait([fake.schedule(job)])[0]
        assert plain["status"] == "STATUS_SUCCESSFUL", proc.output()

        # Marking and defaults: the next task is stamped, the provider shows the new defaults.
        fake.admin_set("watermark", 1)  # as the page sends a checkbox
        assert fake.app_config.get("watermark") == "1", "the page's save reached the app's config"
        fake.admin_set(f"{key}_steps", "3")
        fake.admin_set(f"{key}_size", "256x384 (portrait 2:3)")
        provider = f"{APP_ID}:tiny-onnx"
        _wait(lambda: fake.providers[provider]["optional_input_shape_defaults"]["steps"] == 3, proc=proc)
        assert fake.providers[provider]["optional_input_shape_defaults"]["size"] == "256x384"
        # The new default shape is made ready (compiled, timed) before a task asks for it.
        _wait(lambda: "is ready at its new default size and guidance" in proc.output(), proc=proc)
        marked = fake.wait([fake.schedule(job)])[0]
        a, b = (np.asarray(Image.open(io.BytesIO(_png(fake, t))).convert("RGB"), dtype=np.int16)
                for t in (plain, marked))
        h, w = a.shape[:2]
        assert np.abs(a[h - h // 8:, : w // 2] - b[h - h // 8:, : w // 2]).mean() > 10, "visible mark"
        assert np.array_equal(a[: h // 2], b[: h // 2]), "the rest of the image is untouched"
        defaulted = fake.wait([fake.schedule({"input": "a fox", "numberOfImages": 1})])[0]
        assert Image.open(io.BytesIO(_png(fake, defaulted))).size == (256, 384)

        # A new model: loaded between tasks, its provider replaces the old one, the next task runs on it.
        fake.admin_set("model", str(second))
        new = f"{APP_ID}:tiny-v-ov"
        _wait(lambda: new in fake.providers and provider not in fake.providers, proc=proc)
        done = fake.wait([fake.schedule(job)])[0]
        assert done["status"] == "STATUS_SUCCESSFUL", proc.output()
        assert fake.tasks[done["id"]]["_provider"] == new
        form = fake.settings_forms[FORM_ID]
        assert f"{model_key(str(second))}_steps" in [f["id"] for f in form["fields"]]
        assert "admin settings applied" in proc.output()

        # A model that cannot be loaded: the admin is told in nextcloud.log, the working model stays.
        fake.admin_set("model", str(tmp_path / "missing"))
        _wait(lambda: any("could not be applied" in (e["message"] or "") for e in fake.logged), proc=proc)
        _wait(lambda: new in fake.providers, proc=proc)
        again = fake.wait([fake.schedule(job)])[0]
        assert again["status"] == "STATUS_SUCCESSFUL", proc.output()
        # The same refused value is not loaded again at every poll (each try would stop the workers).
        time.sleep(1.5)
        assert sum("could not be applied" in (e["message"] or "") for e in fake.logged) == 1, proc.output()
    finally:
        proc.stop()
        fake.stop()


def test_stored_values_are_parsed_and_bad_ones_named() -> None:
    base = Settings.from_env({"T2I_MODEL": "sd-turbo", "T2I_THREADS": "4"})
    choice = choose(base, {"threads": "2", "decoder": "taesd", "watermark": "true", "ai_marking": "0",
                           "sd_turbo_size": "768x512 (landscape 3:2)", "sd_turbo_steps": "2",
                           "sd_turbo_guidance": ""})
    s = choice.settings
    assert (s.runtime.threads, s.runtime.decoder, s.images.watermark, s.images.ai_marking) == (2, "taesd", True, False)
    assert choice.defaults["sd-turbo"] == Defaults(width=768, height=512, steps=2)
    assert choice.problems == []
    # Unset fields keep the deploy-time values; bad ones are ignored and named with the value.
    bad = choose(base, {"threads": "-1", "decoder": "fast", "watermark": "perhaps", "sd_turbo_steps": "2.5",
                        "sd_turbo_size": "big"})
    assert bad.settings == base
    text = "\n".join(bad.problems)
    for word in ("threads='-1'", "decoder='fast'", "vae, taesd", "watermark='perhaps'", "sd_turbo_steps='2.5'",
                 "sd_turbo_size='big'", "WIDTHxHEIGHT"):
        assert word in text


def test_the_form_passes_nextclouds_schema_check(onnx_bundle: Path) -> None:
    from standalone_helpers import load_service

    service = load_service(onnx_bundle)
    form = build_form(Settings(), {"tiny": service})
    assert form_problem(form) == ""
    broken = {**form, "fields": [{**form["fields"][2], "options": [{"name": "vae", "value": "vae"}]}]}
    assert "option strings" in form_problem(broken), "the fake's check can fail"
    # Per-model defaults set on the pipeline are what requests without them get; wrong ones are refused.
    service.pipeline.use_defaults(Defaults(width=320, height=256, steps=4))
    assert service.defaults.size == "320x256" and service.defaults.steps == 4
    with pytest.raises(Exception, match="steps"):
        service.pipeline.use_defaults(Defaults(steps=1000))
    service.pipeline.use_defaults(Defaults())
    assert service.defaults.size == "256x256"


@pytest.mark.parametrize("field, value, words", [
    ("threads", "inf", "not a finite number"), ("threads", "nan", "not a finite number"),
    ("threads", "-5", "use 0 (every core)"), ("threads", "99999", "up to 1024"),
    ("model", " , ", "no model named"), ("decoder", "nan", "vae, taesd"), ("ai_marking", "inf", "yes/no"),
    ("sd_turbo_steps", "inf", "not a finite number"), ("sd_turbo_steps", "nan", "not a finite number"),
    ("sd_turbo_steps", "0", "use 1 to 100"), ("sd_turbo_steps", "1e300", "use 1 to 100"),
    ("sd_turbo_guidance", "nan", "not a finite number"), ("sd_turbo_guidance", "-5", "use 0 to 30"),
    ("sd_turbo_guidance", "inf", "not a finite number"), ("sd_turbo_size", "99999x1", "multiple of 64"),
    ("sd_turbo_size", "0x0 (square)", "multiple of 64"),
])
def test_every_field_ignores_a_value_out_of_range_and_names_it(field: str, value: str, words: str) -> None:
    # 'inf' and 'nan' in CPU threads or a model's default steps raised OverflowError/ValueError out of choose:
    # the models failed to load at every start, or the settings loop died.
    base = Settings.from_env({"T2I_MODEL": "sd-turbo", "T2I_THREADS": "4"})
    choice = choose(base, {field: value})
    assert choice.settings == base and choice.defaults["sd-turbo"] == Defaults()
    assert len(choice.problems) == 1 and f"{field}={value!r} ignored" in choice.problems[0], choice.problems
    assert words in choice.problems[0], choice.problems


def test_bad_values_neither_stop_the_start_nor_the_settings_loop(onnx_bundle: Path, tmp_path: Path) -> None:
    fake = FakeNextcloud(version=32).start()
    key = model_key("tiny-onnx")
    (tmp_path / "tiny-onnx").symlink_to(onnx_bundle)
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": str(tmp_path / "tiny-onnx"), "T2I_THREADS": "1",
                                                     "T2I_POLL_INTERVAL": "0.2", "T2I_SETTINGS_POLL": "0.3"})
    provider = f"{APP_ID}:tiny-onnx"

    def logged(*words: str) -> bool:
        return any(all(w in (e["message"] or "") for w in words) for e in fake.logged)

    try:
        # Saved before the app starts: it starts anyway, on the deploy-time values, and says what it ignored.
        for field, value in (("threads", "inf"), (f"{key}_steps", "inf"), (f"{key}_guidance", "nan")):
            fake.app_config[field] = value  # stored by an earlier deploy: the page saves only into a form
        assert fake.install(proc)["error"] == "", proc.output()
        assert fake.enable_answers[-1]["status"] == 200, fake.enable_answers
        for field, value in (("threads", "inf"), (f"{key}_steps", "inf"), (f"{key}_guidance", "nan")):
            assert logged(f"{field}='{value}' ignored"), (field, fake.logged)
        defaults = fake.providers[provider]["optional_input_shape_defaults"]
        # Saved while it runs: each is named, and a valid change after them is still applied.
        for field, value in (("threads", "nan"), (f"{key}_guidance", "-5"), (f"{key}_size", "99999x1"),
                             (f"{key}_steps", "nan")):
            fake.admin_set(field, value)
            _wait(lambda f=field, v=value: logged(f"{f}='{v}' ignored"), proc=proc)  # type: ignore[misc]
        assert fake.providers[provider]["optional_input_shape_defaults"] == defaults
        fake.admin_set(f"{key}_steps", "3")
        _wait(lambda: fake.providers[provider]["optional_input_shape_defaults"]["steps"] == 3, proc=proc)
        done = fake.wait([fake.schedule({"input": "a fox", "numberOfImages": 1})])[0]
        assert done["status"] == "STATUS_SUCCESSFUL", proc.output()
        assert "Traceback" not in proc.output(), proc.output()
    finally:
        proc.stop()
        fake.stop()


def test_a_new_deploy_value_replaces_the_pages_override_and_the_old_form_goes(bundles: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    # AppAPI keeps the page's values through an unregister: a model saved on the page against an earlier deploy
    # beat the T2I_MODEL of the next one. And the form Nextcloud's page could not save into is removed.
    import json

    from backend.nextcloud.admin_defaults import DEPLOYED_KEY
    from backend.nextcloud.admin_settings import OLD_FORM_IDS

    first, second = bundles
    fake = FakeNextcloud(version=32).start()
    earlier = {"model": str(second), "threads": "1", "decoder": "vae", "ai_marking": "1", "watermark": "0"}
    fake.app_config.update({"model": str(second), "watermark": "1", DEPLOYED_KEY: json.dumps(earlier)})
    fake.settings_forms[OLD_FORM_IDS[0]] = {"id": OLD_FORM_IDS[0], "fields": []}
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": str(first), "T2I_THREADS": "1"})
    try:
        assert fake.install(proc)["error"] == "", proc.output()
        assert list(fake.providers) == [f"{APP_ID}:tiny-onnx"], "the new deploy's model"
        assert "model" not in fake.app_config and fake.app_config["watermark"] == "1", fake.app_config
        assert json.loads(fake.app_config[DEPLOYED_KEY])["model"] == str(first)
        assert any("T2I_MODEL=" in (e["message"] or "") for e in fake.logged), fake.logged
        _wait(lambda: OLD_FORM_IDS[0] not in fake.settings_forms and FORM_ID in fake.settings_forms, proc=proc)
    finally:
        proc.stop()
        fake.stop()
