"""The ExApp end to end: the real ``text2image serve`` process against the fake Nextcloud, with the tiny model.

Acceptance 1 (lifecycle and good tasks), 2 (bad tasks), 3 (cancel), 5 (auth) of issue #3.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest
from fake_nextcloud import APP_ID, ExAppProcess, FakeNextcloud, ScheduleError
from PIL import Image

PROVIDER = f"{APP_ID}:tiny-onnx"


@pytest.fixture
def bundle(onnx_bundle: Path, tmp_path: Path) -> Path:
    """The tiny bundle under a fixed folder name (the provider id is taken from it)."""
    link = tmp_path / "tiny-onnx"
    link.symlink_to(onnx_bundle)
    return link


def _service(fake: FakeNextcloud, tmp: Path, bundle: Path, **env: str) -> ExAppProcess:
    settings = {"T2I_MODEL": str(bundle), "T2I_POLL_INTERVAL": "0.2", "T2I_THREADS": "1", **env}
    return ExAppProcess(fake, tmp / "storage", settings)


@pytest.fixture
def nc32(tmp_path: Path, bundle: Path):
    fake = FakeNextcloud(version=32).start()
    proc = _service(fake, tmp_path, bundle, T2I_MAX_BATCH="1")
    yield fake, proc
    proc.stop()
    fake.stop()


def _png(fake: FakeNextcloud, file_id: int) -> Image.Image:
    return Image.open(io.BytesIO(fake.files[file_id]))


def _progress(fake: FakeNextcloud, tid: int) -> list[float]:
    return [r["body"]["progress"] for r in fake.sent("/progress", tid)]


def test_lifecycle_and_three_tasks(nc32) -> None:
    fake, proc = nc32
    t0 = time.monotonic()
    status = fake.install(proc)
    init_s = time.monotonic() - t0
    assert status == {**status, "progress": 100, "error": ""}, proc.output()
    steps = [s["progress"] for s in fake.init_status]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 100
    assert fake.enable_answers[-1] == {"enabled": 1, "status": 200, "answer": {"error": ""}}
    provider = fake.providers[PROVIDER]
    assert provider["task_type"] == "core:text2image" and provider["expected_runtime"] >= 1
    assert {s["name"] for s in provider["optional_input_shape"]} >= {"size", "steps", "guidance", "negative_prompt",
                                                                      "seed"}
    assert provider["optional_input_shape_defaults"]["size"] == "256x256"

    tids = [
        fake.schedule({"input": "a red fox", "numberOfImages": 1}),
        fake.schedule({"input": "two foxes", "numberOfImages": 2}),
        fake.schedule({"input": "a fox", "numberOfImages": 2, "size": "384x384", "steps": 3, "guidance": 2.0,
                       "negative_prompt": "blurry", "seed": 42, "scheduler": "euler"}),
    ]
    t1 = time.monotonic()
    done = fake.wait(tids, timeout=60)
    tasks_s = time.monotonic() - t1
    assert [t["status"] for t in done] == ["STATUS_SUCCESSFUL"] * 3, proc.output()
    for task, (n, side) in zip(done, [(1, 256), (2, 256), (2, 384)], strict=True):
        assert len(task["output"]["images"]) == n
        for fid in task["output"]["images"]:
            assert _png(fake, fid).size == (side, side)
        sent = _progress(fake, task["id"])
        assert sent == sorted(sent) and all(0 <= p <= 1 for p in sent) and len(sent) >= 2
        assert task["progress"] == 1.0
        assert fake.handouts[task["id"]] == 1
    # numberOfImages 2 with T2I_MAX_BATCH=1 ran as two batches of 25 steps: the progress moved through the first
    # batch's share and through the second's (the generation sends a report whenever the last one was answered).
    two = _progress(fake, tids[1])
    assert any(p < 0.45 for p in two) and any(0.45 < p < 0.9 for p in two), two
    meta = _png(fake, done[2]["output"]["images"][1]).text
    assert (meta["seed"], meta["steps"], meta["negative_prompt"], meta["size"]) == ("43", "3", "blurry", "384x384")
    assert meta["AI-generated"] == "true" and "trainedAlgorithmicMedia" in meta["XML:com.adobe.xmp"]

    assert fake.disable(stop_container=lambda: proc.signal()) == ""
    assert PROVIDER not in fake.providers
    assert "stopped cleanly" in proc.output()
    print(f"\ninit to 100: {init_s:.1f} s (process start included); 3 tasks / 5 images: {tasks_s:.1f} s")


@pytest.mark.parametrize("version", [32, 33])
def test_bad_tasks_fail_with_a_message_and_the_worker_goes_on(tmp_path: Path, bundle: Path, version: int) -> None:
    fake = FakeNextcloud(version=version).start()
    proc = _service(fake, tmp_path, bundle)
    try:
        fake.install(proc)
        # What a real server refuses at scheduling already (type checks): it never reaches the provider.
        refused = {'"numberOfImages": Non-numeric item provided for Number slot': {"numberOfImages": "x"},
                   '"size": Wrong value given for Enum slot. Got "abc"': {"size": "abc"},
                   'Got "100x100"': {"size": "100x100"}}
        for what, extra in refused.items():
            with pytest.raises(ScheduleError) as err:
                fake.schedule({"input": "a fox", "numberOfImages": 1, **extra})
            assert err.value.status == 400 and what in err.value.message
        # What reaches the provider (ranges are the provider's job) ...
        bad = {
            "number of images 0 is out of range": {"numberOfImages": 0},
            "number of images 13 is out of range": {"numberOfImages": 13},
            "steps 1000 is out of range": {"numberOfImages": 1, "steps": 1000},
            "prompt is 100000 characters long": {"numberOfImages": 1, "input": "x" * 100_000},
        }
        # ... and what only a server without type checks would pass on (check=False stores the input as given).
        unchecked = {
            "number of images 'x' is not a whole number": {"numberOfImages": "x"},
            "size 'abc' is not of the form WIDTHxHEIGHT": {"numberOfImages": 1, "size": "abc"},
            "width 100 is not allowed": {"numberOfImages": 1, "size": "100x100"},
            "unknown input 'foo'": {"numberOfImages": 1, "foo": 1},
        }
        ids = {msg: fake.schedule({"input": "a fox", **inp}) for msg, inp in bad.items()}
        ids.update({msg: fake.schedule({"input": "a fox", **inp}, check=False) for msg, inp in unchecked.items()})
        dropped = fake.schedule({"input": "a fox", "numberOfImages": 1, "foo": 1})  # the server drops "foo"
        good = fake.schedule({"input": "a fox", "numberOfImages": 1})
        fake.wait([*ids.values(), dropped, good])
        for msg, tid in ids.items():
            task = fake.task(tid)
            assert task["status"] == "STATUS_FAILED", (msg, task)
            assert msg in task["_error"] and len(task["_error"]) <= 1000
            body = fake.sent("/result", tid)[-1]["body"]
            if version >= 33:
                assert msg in task["_user_error"] and msg in body["userFacingErrorMessage"]
            else:
                assert "userFacingErrorMessage" not in body and task["_user_error"] is None
        assert "foo" not in fake.task(dropped)["input"]
        assert fake.task(dropped)["status"] == fake.task(good)["status"] == "STATUS_SUCCESSFUL"
    finally:
        proc.stop()
        fake.stop()


def test_cancel_stops_within_a_step_and_uploads_nothing(nc32) -> None:
    fake, proc = nc32
    fake.install(proc)
    slow = fake.schedule({"input": "a fox", "numberOfImages": 1, "size": "512x512", "steps": 100})
    after = fake.schedule({"input": "next", "numberOfImages": 1})
    while len(fake.sent("/progress", slow)) < 5:
        time.sleep(0.02)
    cancelled_at = time.monotonic()
    fake.cancel(slow)
    fake.wait([after], timeout=30)
    calls = fake.sent("/progress", slow)
    step_s = (calls[4]["t"] - calls[1]["t"]) / 3
    late = [c for c in calls if c["t"] > cancelled_at]
    free_s = next(r["t"] for r in fake.sent("/progress", after)) - cancelled_at
    assert len(late) <= 1, late  # the answer to the first report after the cancel says CANCELLED
    assert fake.sent("/file", slow) == [] and fake.sent("/result", slow) == []
    assert fake.task(slow)["status"] == "STATUS_CANCELLED" and fake.task(after)["status"] == "STATUS_SUCCESSFUL"
    assert free_s < step_s + 0.5, (free_s, step_s)
    print(f"\nstep {step_s * 1000:.0f} ms; next task started {free_s * 1000:.0f} ms after the cancel")


def test_requests_without_appapi_auth_get_401(nc32) -> None:
    fake, proc = nc32
    proc.start()
    fake.heartbeat()
    assert fake.call_exapp("GET", "/heartbeat", auth=False) == (200, {"status": "ok"})
    wrong = base64.b64encode(b":wrong").decode()
    for headers in ({}, {"AUTHORIZATION-APP-API": wrong}, {"EX-APP-ID": "other"}, {"AUTHORIZATION-APP-API": "x"}):
        for method, path in (("POST", "/init"), ("PUT", "/enabled?enabled=1"), ("POST", "/trigger?providerId=p"),
                             ("GET", "/docs"), ("GET", "/nothing")):
            status, _ = fake.call_exapp(method, path, auth=bool(headers), headers=headers)
            assert status == 401, (method, path, headers)
    missing_version = {"EX-APP-VERSION": ""}
    assert fake.call_exapp("POST", "/trigger?providerId=p", headers=missing_version)[0] == 401
    assert fake.call_exapp("POST", "/trigger?providerId=p") == (200, {})


def test_a_wrong_secret_is_never_written_anywhere(nc32) -> None:
    # Issue #12, finding 1: nc_py_api printed "Invalid App secret:<sent> != <APP_SECRET>" on every failed login,
    # and a newline in the sent secret forged a log line.
    from fake_appapi import SECRET

    fake, proc = nc32
    proc.start()
    fake.heartbeat()
    sent = "guess-42\n2026-01-01 00:00:00,000 INFO forged: all fine"
    # The last one has user and secret swapped: the user part of a failed login is the secret itself.
    for value in (f"admin:{sent}", sent, f":{SECRET[:-1]}", f"{SECRET}:admin"):
        header = {"AUTHORIZATION-APP-API": base64.b64encode(value.encode()).decode()}
        assert fake.call_exapp("POST", "/init", headers=header)[0] == 401
    assert fake.call_exapp("PUT", "/enabled?enabled=1")[0] == 200  # the right secret still works
    proc.signal()
    log = proc.output()
    assert log.count("wrong app secret") == 4, log[-2000:]
    for secret in (SECRET, "guess-42", SECRET[:-1]):
        assert secret not in log, f"{secret!r} was written to the log"
    assert not any(line.startswith("2026-01-01") for line in log.splitlines()), "a forged log line"


def test_trigger_wakes_the_worker_on_nextcloud_33(tmp_path: Path, bundle: Path) -> None:
    fake = FakeNextcloud(version=33).start()
    proc = _service(fake, tmp_path, bundle, T2I_POLL_INTERVAL="60")
    try:
        fake.install(proc)
        time.sleep(0.5)  # the worker's first poll has come back empty: it now waits 60 s unless triggered
        t0 = time.monotonic()
        tid = fake.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})
        fake.wait([tid], timeout=20)
        assert fake.task(tid)["status"] == "STATUS_SUCCESSFUL"
        assert time.monotonic() - t0 < 10
    finally:
        proc.stop()
        fake.stop()


def test_init_failure_is_reported_not_a_crash(tmp_path: Path) -> None:
    fake = FakeNextcloud(version=32).start()
    fake.enabled = False  # a first install: AppAPI has not enabled the app yet
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": "nobody/no-such-model", "T2I_OFFLINE": "1"})
    try:
        status = fake.install(proc)
        assert "no-such-model" in status["error"] and "offline" in status["error"], status
        assert fake.enable_answers == []
        fake.heartbeat(timeout=5)  # still up
        assert proc.proc is not None and proc.proc.poll() is None
        error = fake.enable()
        assert "no-such-model" in error and not fake.enabled
    finally:
        proc.stop()
        fake.stop()


def _failing_decoder(bundle: Path, tmp_path: Path) -> Path:
    """A copy of the bundle whose VAE decoder runs at the native size only (a Reshape to its 32×32 latents), so the
    service loads and measures itself, and a task of another size meets an engine failure in the middle: nothing
    but real graphs."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    broken = Path(shutil.copytree(bundle.resolve(), tmp_path / "broken-onnx"))
    (broken / "manifest.json").unlink()
    latent = helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["batch", 4, "h", "w"])
    sample = helper.make_tensor_value_info("sample", TensorProto.FLOAT, None)
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 4, 32, 32])
    graph = helper.make_graph([helper.make_node("Reshape", ["latent_sample", "shape"], ["sample"])], "decoder",
                              [latent], [sample], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              str(broken / "vae_decoder" / "model.onnx"))
    return broken


def test_an_engine_failure_is_an_internal_error_not_refused_input(tmp_path: Path, bundle: Path) -> None:
    # Issue #13: ImageService relabelled every runtime error as "your input was refused".
    from backend.nextcloud.worker import INTERNAL_ERROR

    fake = FakeNextcloud(version=33).start()
    proc = _service(fake, tmp_path, _failing_decoder(bundle, tmp_path))
    try:
        assert fake.install(proc)["progress"] == 100, proc.output()[-2000:]
        [task] = fake.wait([fake.schedule({"input": "a fox", "numberOfImages": 1, "size": "384x384"})])
        assert task["status"] == "STATUS_FAILED"
        assert task["_user_error"] == INTERNAL_ERROR
        assert "onnxruntime failed to run vae_decoder" in task["_error"], task["_error"]
        assert "refused" not in task["_error"]
    finally:
        proc.stop()
        fake.stop()


def test_portrait_and_landscape_sizes_are_offered_with_labels(onnx_bundle: Path) -> None:
    # Issue #12, finding 6: Assistant showed only squares; its size menu lists the provider's enum names.
    from standalone_helpers import load_service

    from backend.nextcloud.provider import build_provider

    provider = build_provider("tiny", load_service(onnx_bundle))
    sizes = {e.value: e.name for e in provider.optional_input_shape_enum_values["size"]}
    assert provider.optional_input_shape_defaults["size"] == "256x256" == next(iter(sizes))
    assert sizes["256x256"] == "256×256 (square, native)"
    assert sizes["384x256"] == "384×256 (landscape 3:2)" and sizes["256x384"] == "256×384 (portrait 2:3)"
    assert sizes["448x256"] == "448×256 (landscape 16:9)" and "256x448" in sizes
    assert "384x384" in sizes and "1024x1024" in sizes
    for value in sizes:
        w, h = map(int, value.split("x"))
        assert w % 64 == h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024, value


def test_a_resume_before_init_still_verifies_the_bundle(tmp_path: Path, bundle: Path) -> None:
    # Issue #12, finding 3: AppAPI 32 marks a new app enabled before it posts /init, so an ExApp started first
    # (manual install) resumed, loaded the model without the sha256 check of /init and registered its provider.
    import shutil

    damaged = Path(shutil.copytree(bundle.resolve(), tmp_path / "tiny-onnx-copy"))
    merges = damaged / "tokenizer" / "merges.txt"
    merges.write_text(merges.read_text().replace("0.2", "0.3"))  # same size: only the hash tells
    fake = FakeNextcloud(version=32).start()
    assert fake.enabled, "registration has marked the app enabled"
    proc = _service(fake, tmp_path, damaged)
    try:
        status = fake.install(proc)
        assert "do not match its manifest.json (tokenizer/merges.txt)" in status["error"], status
        assert fake.providers == {}, "no provider may be registered for an unverified model"
        assert "resumed: providers registered" not in proc.output()
    finally:
        proc.stop()
        fake.stop()


def test_before_registration_the_state_is_asked_with_backoff(tmp_path: Path, bundle: Path) -> None:
    # Issue #12, finding 4: each state poll of an app Nextcloud does not know yet logs an error there, so the asks
    # are few; yet a process AppAPI never calls (started before the registration of another one) must find out
    # that the app was enabled and take tasks.
    fake = FakeNextcloud(version=32).start()
    fake.registered = False
    proc = _service(fake, tmp_path, bundle)  # T2I_POLL_INTERVAL=0.2: the asks wait 1, 2, then 2.4 s at most
    try:
        proc.start()
        fake.heartbeat()
        deadline = time.monotonic() + 30
        while "does not know this app yet" not in proc.output():
            assert time.monotonic() < deadline, proc.output()[-2000:]
            time.sleep(0.1)
        time.sleep(4)
        asked = fake.unknown_app_requests
        assert 1 <= asked <= 6, f"{asked} asks in about 4 s (a fixed 0.2 s poll asks 20 times)"
        assert proc.output().count("does not know this app yet") == 1, "logged once, not per ask"
        fake.registered = True  # registered (enabled) without a word to this process: no /init, no /enabled
        while PROVIDER not in fake.providers:
            assert time.monotonic() < deadline + 60, proc.output()[-2000:]
            time.sleep(0.1)
        assert fake.init_status == [] and fake.enable_answers == []
        assert fake.wait([fake.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})])[0][
            "status"] == "STATUS_SUCCESSFUL"
    finally:
        proc.stop()
        fake.stop()


def test_disable_mid_task_settles_the_task_before_unregistering(tmp_path: Path, bundle: Path) -> None:
    # Issue #12, finding 2: on a real Nextcloud the providers were unregistered at once, every result POST then
    # answered 500 and the worker retried forever, the task RUNNING until the app was enabled again.
    from backend.nextcloud.worker import STOPPED

    fake = FakeNextcloud(version=33).start()
    proc = _service(fake, tmp_path, bundle)
    try:
        assert fake.install(proc)["progress"] == 100
        tid = fake.schedule({"input": "a fox", "numberOfImages": 1, "size": "1024x1024", "steps": 100})
        deadline = time.monotonic() + 120
        while not _progress(fake, tid) or _progress(fake, tid)[-1] < 0.1:
            assert time.monotonic() < deadline, proc.output()[-2000:]
            time.sleep(0.05)
        t0 = time.monotonic()
        assert fake.disable() == ""
        took = time.monotonic() - t0
        task = fake.task(tid)
        assert task["status"] == "STATUS_FAILED" and task["_user_error"] == STOPPED, (task, proc.output()[-2000:])
        assert took < 30, f"AppAPI waits 60 s for /enabled; disabling took {took:.1f} s"
        assert PROVIDER not in fake.providers
        time.sleep(2)
        assert len(fake.sent("/result", tid)) == 1, "one result, no retry loop"
    finally:
        proc.stop()
        fake.stop()


def test_a_short_task_runs_between_the_batches_of_a_long_one(nc32) -> None:
    # Issue #14: one user's 12-image task held every other user's task behind it for its whole run.
    fake, proc = nc32  # T2I_MAX_BATCH=1: every image is a batch of its own
    fake.install(proc)
    long = fake.schedule({"input": "a long one", "numberOfImages": 12, "steps": 20}, user="admin")
    end = time.monotonic() + 60
    while fake.task(long)["status"] != "STATUS_RUNNING" and time.monotonic() < end:
        time.sleep(0.02)
    short = fake.schedule({"input": "a short one", "numberOfImages": 1, "steps": 2}, user="alice")
    assert fake.wait([short], timeout=120)[0]["status"] == "STATUS_SUCCESSFUL", proc.output()[-3000:]
    assert fake.task(long)["status"] == "STATUS_RUNNING", "the short task did not wait for the long one to end"
    done = fake.wait([long, short], timeout=120)
    assert [t["status"] for t in done] == ["STATUS_SUCCESSFUL"] * 2
    assert [len(t["output"]["images"]) for t in done] == [12, 1]
    assert fake.handouts[long] == fake.handouts[short] == 1
    assert f"task {short} runs between the batches of another task" in proc.output()
    assert _progress(fake, long) == sorted(_progress(fake, long)), "the long task's progress never goes back"
