"""Issue #14's memory levers against the fp32 path, with the pixels they cost: fp16-compressed weights in the
OpenVINO bundle, the weights file's pages given back once compiled, and one shape-free compile for every size."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from runtime import Pipeline
from runtime.engines import mapped

ARGS = {"prompt": "a red fox", "steps": 4, "seed": 11, "width": 256, "height": 256, "guidance": 7.5}


def _load(bundle: Path, **kw: object) -> Pipeline:
    return Pipeline.load(bundle, device="cpu", engine="openvino", threads=2, precision="fp32", **kw)  # type: ignore[arg-type]


def test_weights_file_pages_are_given_back_and_pixels_unchanged(openvino_bundle: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    weights = openvino_bundle / "unet" / "openvino_model.bin"
    kept = _load(openvino_bundle)
    with monkeypatch.context() as m:
        m.setattr("runtime.engines.mapped.release", lambda path: 0)
        before = kept.generate(**ARGS)
    resident_kept = mapped.resident_bytes(weights)
    assert mapped.read_only_ranges(weights), "OpenVINO maps the weights file read-only"
    assert resident_kept >= weights.stat().st_size // 2, "compiling read the file's pages into this process"
    given = _load(openvino_bundle)
    after = given.generate(**ARGS)
    assert mapped.resident_bytes(weights) <= resident_kept - weights.stat().st_size // 2
    assert psnr(after, before) == float("inf"), "giving the pages back changes no pixel"
    again = given.generate(**ARGS)  # the compiled model never needed the pages again
    assert psnr(again, before) == float("inf")


def test_one_compile_serves_every_size(openvino_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.engines.openvino")
    shared = _load(openvino_bundle)
    static = _load(openvino_bundle, static_shapes=True)
    for size in ({}, {"width": 320}, {"height": 320, "n": 2}, {}):
        a, b = shared.generate(**{**ARGS, **size}), static.generate(**{**ARGS, **size})
        score = psnr(a, b)
        print(f"shape-free vs static compile at {size or 'the default size'}: PSNR {score:.1f} dB")
        assert a[0].size == b[0].size and score >= 60, (size, score)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled unet")]
    assert sum("all shapes" in line for line in compiled) == 1, compiled
    # Static: one compile per shape, and going back to the first after two others compiles it again (keeps 2).
    assert sum("all shapes" not in line for line in compiled) == 4, compiled


def test_fp16_weights_against_fp32(tiny_source: Path, openvino_bundle: Path, tmp_path: Path) -> None:
    from exporters.export import export_model

    fp16 = export_model(str(tiny_source), "openvino", tmp_path / "fp16", precision="fp16", say=lambda _: None)
    assert json.loads((fp16 / "manifest.json").read_text())["precision"] == "fp16"
    size16 = (fp16 / "unet" / "openvino_model.bin").stat().st_size
    size32 = (openvino_bundle / "unet" / "openvino_model.bin").stat().st_size
    assert 0.45 <= size16 / size32 <= 0.55, (size16, size32)
    score = psnr(_load(fp16).generate(**ARGS), _load(openvino_bundle).generate(**ARGS))
    print(f"OpenVINO fp16-compressed weights vs fp32: PSNR {score:.1f} dB")
    assert score >= 35
    assert np.isfinite(score)
