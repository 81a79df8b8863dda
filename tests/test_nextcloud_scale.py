"""Scale out: two service processes with two workers each, sharing one persistent volume, against one Nextcloud
queue; every task is processed exactly once. Acceptance 6 of issue #3."""

from __future__ import annotations

import re
import time
from pathlib import Path

from fake_nextcloud import ExAppProcess, FakeNextcloud


def test_two_processes_with_two_workers_process_each_task_once(onnx_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "tiny-onnx").symlink_to(onnx_bundle)
    fake = FakeNextcloud(version=32).start()
    env = {"T2I_MODEL": str(tmp_path / "tiny-onnx"), "T2I_POLL_INTERVAL": "0.1", "T2I_THREADS": "2"}
    procs = [ExAppProcess(fake, tmp_path / "storage", env, args=("--workers", "2")) for _ in range(2)]
    try:
        fake.install(procs[0])
        procs[1].start()  # a second container: AppAPI knows one app; it resumes because the app is enabled
        fake.exapp_url = f"http://127.0.0.1:{procs[0].port}"
        fake.heartbeat()
        while not all("workers running" in p.output() or "enabled by AppAPI" in p.output() for p in procs):
            time.sleep(0.05)
        t0 = time.monotonic()
        tids = [fake.schedule({"input": f"fox {i}", "numberOfImages": 1 + i % 2, "steps": 4}) for i in range(20)]
        done = fake.wait(tids, timeout=120)
        elapsed = time.monotonic() - t0
        assert [t["status"] for t in done] == ["STATUS_SUCCESSFUL"] * 20
        for t in done:
            assert fake.handouts[t["id"]] == 1
            assert len(fake.sent("/result", t["id"])) == 1
            assert len(fake.sent("/file", t["id"])) == len(t["output"]["images"]) == t["input"]["numberOfImages"]
        taken = [{int(m) for m in re.findall(r"task (\d+) taken", p.output())} for p in procs]
        workers = [set(re.findall(r"(#\d): task \d+ taken", p.output())) for p in procs]
        assert taken[0].isdisjoint(taken[1]) and taken[0] | taken[1] == set(tids)
        assert all(taken) and workers == [{"#0", "#1"}] * 2, (taken, workers)
        print(f"\n20 tasks / 30 images in {elapsed:.1f} s; split {len(taken[0])}/{len(taken[1])} between processes")
    finally:
        for p in procs:
            p.stop()
        fake.stop()


def test_the_thread_cap_is_for_the_container_not_per_model() -> None:
    # Issue #12, finding 5: with T2I_MODEL=tiny,tiny-v on a 2-thread cap each model got 2 threads, 4 in all.
    from backend.config import Settings
    from backend.nextcloud.models import worker_settings

    def per_worker(**env: str) -> int:
        return worker_settings(Settings.from_env({f"T2I_{k.upper()}": v for k, v in env.items()})).runtime.threads

    assert per_worker(model="tiny,tiny-v", threads="2") == 1
    assert per_worker(model="tiny,tiny-v", threads="8", workers="2") == 2
    assert per_worker(model="tiny", threads="8", workers="2") == 4
    assert per_worker(model="a,b,c", threads="2") == 1, "never below one thread"
