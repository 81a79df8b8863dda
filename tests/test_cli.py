"""The text2image command end to end on the tiny model: export, generate, info, verify, and its error texts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from backend.cli import cli
from backend.images import DIGITAL_SOURCE_TYPE, read_metadata


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result.output


def _pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


@pytest.mark.parametrize("fixture", ["onnx_bundle", "openvino_bundle"])
def test_generate_writes_pngs_reproducibly(request: pytest.FixtureRequest, fixture: str, tmp_path: Path) -> None:
    bundle = request.getfixturevalue(fixture)
    base = ["generate", "a red fox", "--model", str(bundle), "-n", "2", "--size", "256x320", "--steps", "3"]
    run(*base, "--seed", "7", "--out", str(tmp_path / "o1"))
    run(*base, "--seed", "7", "--out", str(tmp_path / "o2"))
    run(*base, "--seed", "8", "--out", str(tmp_path / "o3"))
    first = sorted((tmp_path / "o1").glob("*.png"))
    assert [p.name for p in first] == ["t2i-7.png", "t2i-8.png"]
    for p in first:
        with Image.open(p) as im:
            assert im.size == (256, 320)
    a, b, c = _pixels(tmp_path / "o1"), _pixels(tmp_path / "o2"), _pixels(tmp_path / "o3")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), "same seed must give identical pixels"
    assert not np.array_equal(a[0], c[0]), "another seed must give other pixels"
    assert np.array_equal(a[1], c[0]), "image i uses seed+i, so seed 8 alone reproduces the second image"
    meta = read_metadata(first[0])
    assert meta["prompt"] == "a red fox" and meta["seed"] == "7" and meta["steps"] == "3"
    assert meta["AI-generated"] == "true" and DIGITAL_SOURCE_TYPE in meta["XML:com.adobe.xmp"]
    assert {"negative_prompt", "guidance", "scheduler", "model"} <= set(meta)


def test_export_rerun_skips(onnx_bundle: Path, tiny_source: Path) -> None:
    out = run("export", str(tiny_source), "--format", "onnx", "--out", str(onnx_bundle))
    assert "already a finished onnx/fp32 export" in out


def test_verify_and_info(bundle_copy: Path) -> None:
    assert "all files match" in run("verify", str(bundle_copy))
    report = json.loads(run("info", "--model", str(bundle_copy), "--json"))
    assert report["bundle"]["format"] == "onnx"
    assert report["would_use"]["engine"] == "onnxruntime"
    assert report["threads"] >= 1 and "onnxruntime" in report["engines"]
    graph = bundle_copy / "unet" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    result = CliRunner().invoke(cli, ["verify", str(bundle_copy)])
    assert result.exit_code == 1
    assert "unet/model.onnx" in result.output and "do not match manifest.json" in result.output


def test_offline_without_model_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2I_MODEL_STORE", str(tmp_path / "store"))
    result = CliRunner().invoke(cli, ["generate", "x", "--model", "sd-turbo", "--offline"])
    assert result.exit_code == 1
    assert "is not in the local store" in result.output and "--model tiny" in result.output
