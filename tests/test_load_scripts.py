"""The capacity scripts of issue #14 on the tiny model: they drive the real services and print every figure; the
ExApp ones also show where each task's time went, from the ExApp's debug timeline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporters.export import export_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def taesd_openvino(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(str(tiny_source), "openvino", tmp_path_factory.mktemp("load") / "tiny-ov",
                        say=lambda _: None, taesd="tiny")


def _run(script: str, *args: str, skip_when: tuple[str, ...] = ()) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    if done.returncode and any(done.stderr.startswith(reason) for reason in skip_when):
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_exapp_capacity_through_the_fake_nextcloud(taesd_openvino: Path) -> None:
    out = _run("capacity_exapp.py", str(taesd_openvino), "--clients", "2", "--seconds", "4", "--size", "256",
               "--decoder", "taesd", "--greedy")
    images = int(re.search(r"(\d+) images in", out).group(1))  # type: ignore[union-attr]
    tasks = int(re.search(r"one-image task latency: p50 [\d.]+ s, p95 [\d.]+ s \((\d+) tasks\)", out).group(1))  # type: ignore[union-attr]
    assert images == tasks + 12 and tasks >= 2, out
    assert "12-image task latency" in out
    for phase in ("generation", "cancel check", "journal", "upload", "result"):
        assert re.search(rf"per task, {phase}: median [\d.]+ s \({tasks + 1} tasks\)", out), (phase, out)
    assert re.search(r"ExApp memory: peak [1-9]\d* MB", out), out


def test_standalone_capacity(taesd_openvino: Path) -> None:
    out = _run("capacity.py", str(taesd_openvino), "--clients", "2", "--seconds", "4", "--size", "256",
               "--decoder", "taesd", "--greedy")
    assert re.search(r"\d+ images in [\d.]+ s = [\d,]+ images/hour", out), out
    assert "one-image task latency: p50" in out and "12-image task latency" in out
    assert re.search(r"memory: peak [1-9]\d* MB", out), out


def test_exapp_capacity_through_the_real_nextcloud(taesd_openvino: Path) -> None:
    out = _run("capacity_nextcloud.py", str(taesd_openvino), "--tasks", "3", "--clients", "2", "--size", "256",
               "--seconds", "120", skip_when=("no Nextcloud test server tree", "no PHP"))
    assert re.search(r"\b3 images in [\d.]+ s = [\d,]+ images/hour \([\d.]+× the 120 requests/hour", out), out
    assert re.search(r"schedule → SUCCESSFUL: p50 [\d.]+ s, p95 [\d.]+ s", out), out
    assert "(the admin's defaults set to this shape and made ready first)" in out, out
    assert re.search(r"CPU per task: PHP [\d.]+ s, ExApp [\d.]+ s", out), out
    assert re.search(r"without Nextcloud, right after: median [\d.]+ s per image, prompt → PNG \(3 images\)", out), out
    # One timeline row per task: its id, its user and 12 figures (queue, the generation's parts, the calls, total).
    rows = re.findall(r"^ +\d+ +user[12]((?: +[\d.]+){12})$", out, re.MULTILINE)
    assert len(rows) == 3, out
