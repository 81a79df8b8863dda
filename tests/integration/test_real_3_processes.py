"""ExApp processes coming and going on a real Nextcloud 32.0.1: two processes started before the registration,
kill -9 mid-task, and an unregister/register cycle with stored settings."""

from __future__ import annotations

import re
import signal
from pathlib import Path

from fake_appapi import APP_ID, ExAppProcess
from real_nextcloud import PROVIDER, RealNextcloud, SharedApp, exapp_process, heartbeat, wait_for


def _taken(proc: ExAppProcess) -> list[int]:
    return [int(m) for m in re.findall(r": task (\d+) taken \(attempt", proc.output())]


def test_two_processes_started_before_the_registration_both_take_work(
        nextcloud: RealNextcloud, shared: SharedApp, tiny_onnx: Path, tmp_path: Path) -> None:
    nc = nextcloud
    shared.release()  # the app id is this case's now
    b = exapp_process(nc, tmp_path / "b", tiny_onnx).start()
    a = exapp_process(nc, tmp_path / "a", tiny_onnx).start()
    try:
        for proc in (b, a):
            heartbeat(proc)
            wait_for(lambda p=proc: "does not know this app yet" in p.output(), 60, proc)
        nc.register(a)  # AppAPI calls /init and /enabled on A only
        wait_for(lambda: "resumed: providers registered" in b.output(), 60, b)
        tids = [nc.schedule({"input": f"fox {i}", "numberOfImages": 1, "steps": 12}) for i in range(12)]
        done = nc.wait(tids, timeout=120)
        assert [t["status"] for t in done] == ["STATUS_SUCCESSFUL"] * 12, (a.output()[-2000:], b.output()[-2000:])
        by_a, by_b = _taken(a), _taken(b)
        assert sorted(by_a + by_b) == tids, "each task taken exactly once"
        assert by_a and by_b, f"A took {len(by_a)}, B took {len(by_b)}"
    finally:
        a.stop()
        b.stop()
        nc.unregister()


def test_kill_9_mid_task_and_restart(nextcloud: RealNextcloud, app: ExAppProcess) -> None:
    nc = nextcloud
    tid = nc.schedule({"input": "a fox", "numberOfImages": 1, "size": "512x512", "steps": 60})
    wait_for(lambda: float(nc.task(tid)["progress"] or 0) > 0.05, 60, app)
    assert app.signal(signal.SIGKILL) == -signal.SIGKILL
    assert nc.task(tid)["status"] == "STATUS_RUNNING", "Nextcloud never hands a RUNNING task out again"
    app.start()  # same port, same persistent storage: a restarted container
    [task] = nc.wait([tid], timeout=120)
    assert task["status"] == "STATUS_SUCCESSFUL", app.output()[-3000:]
    assert f"task {tid} was in hand when the service stopped; running it again" in app.output()
    assert len(task["output"]["images"]) == 1


def test_unregister_register_with_stored_settings(nextcloud: RealNextcloud, shared: SharedApp, tiny_onnx: Path,
                                                  tiny_two: Path, tiny_three: Path, tmp_path: Path) -> None:
    nc = nextcloud
    shared.release()
    first = exapp_process(nc, tmp_path / "first", tiny_onnx).start()
    second: ExAppProcess | None = None
    try:
        heartbeat(first)
        nc.register(first)
        assert nc.page_save("model", str(tiny_two))[0] == 200
        assert nc.page_save("watermark", 1)[0] == 200
        wait_for(lambda: nc.providers() == [f"{APP_ID}:tiny-two"], 60, first)
        nc.unregister(rm_data=True)
        first.stop()
        kept = nc.app_config()
        assert kept["model"] == str(tiny_two) and kept["watermark"] == "1", "AppAPI keeps the page's values"

        # A new deploy with another T2I_MODEL: that is the admin's newer word; the unchanged watermark choice stays.
        second = exapp_process(nc, tmp_path / "second", tiny_three).start()
        heartbeat(second)
        nc.register(second)
        three = f"{APP_ID}:tiny-three"
        wait_for(lambda: nc.providers() == [three], 60, second)
        config = nc.app_config()
        assert "model" not in config and config["watermark"] == "1", config
        assert "the settings page's model=" in second.output()
        [task] = nc.wait([nc.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})])
        assert task["status"] == "STATUS_SUCCESSFUL" and f"{three}#0: task {task['id']} taken" in second.output()
        shown = {f["id"]: f["value"] for form in nc.forms().values() for f in form["fields"]}
        assert shown["model"] == "" and shown["watermark"] == "1", shown
        assert nc.page_save("watermark", 0)[0] == 200  # leave the deploy-time value for the cases after this
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.stop()
        nc.unregister()
    assert PROVIDER not in nc.providers()


def test_a_diffusers_checkpoint_folder_as_the_model(nextcloud: RealNextcloud, shared: SharedApp, tiny_source: Path,
                                                    tmp_path: Path) -> None:
    nc = nextcloud
    shared.release()
    proc = exapp_process(nc, tmp_path / "storage", tiny_source, T2I_FORMAT="onnx").start()
    try:
        heartbeat(proc)
        nc.register(proc)  # --wait-finish: /init converts the checkpoint into the model store
        assert nc.providers() == [f"{APP_ID}:tiny"]
        [task] = nc.wait([nc.schedule({"input": "a fox", "numberOfImages": 1, "steps": 2})])
        assert task["status"] == "STATUS_SUCCESSFUL", proc.output()[-3000:]
        assert list((tmp_path / "storage" / "models").glob("tiny-*-onnx/manifest.json")), "converted into the store"
    finally:
        proc.stop()
        nc.unregister()
