"""The capacity scripts of issue #14 on the tiny model: they drive the real services and print every figure; the
ExApp one also shows where each task's time went, from the ExApp's debug timeline."""

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


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_exapp_capacity_through_the_fake_nextcloud(taesd_openvino: Path) -> None:
    out = _run("capacity_exapp.py", str(taesd_openvino), "--clients", "2", "--seconds", "4", "--size", "256",
               "--decoder", "taesd", "--greedy")
    images = int(re.search(r"(\d+) images in", out).group(1))  # type: ignore[union-attr]
    tasks = int(re.search(r"one-image task latency: p50 [\d.]+ s, p95 [\d.]+ s \((\d+) tasks\)", out).group(1))  # type: ignore[union-attr]
    assert images == tasks + 12 and tasks >= 2, out
    assert "12-image task latency" in out
    for phase in ("generation", "journal", "upload", "result"):
        assert re.search(rf"per task, {phase}: median [\d.]+ s \({tasks + 1} tasks\)", out), (phase, out)
    assert re.search(r"ExApp memory: peak [1-9]\d* MB", out), out


def test_standalone_capacity(taesd_openvino: Path) -> None:
    out = _run("capacity.py", str(taesd_openvino), "--clients", "2", "--seconds", "4", "--size", "256",
               "--decoder", "taesd", "--greedy")
    assert re.search(r"\d+ images in [\d.]+ s = [\d,]+ images/hour", out), out
    assert "one-image task latency: p50" in out and "12-image task latency" in out
    assert re.search(r"memory: peak [1-9]\d* MB", out), out
