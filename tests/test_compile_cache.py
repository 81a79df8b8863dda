"""Issue #14, cold start: OpenVINO's compiled shapes kept in the model store. A second load reads them (same pixels,
no new blobs); a changed bundle file or another engine never reads a stale one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from backend.bench.metrics import psnr
from runtime import Pipeline

ARGS = {"prompt": "a red fox", "n": 1, "steps": 2, "seed": 3, "width": 256, "height": 256}


def _blobs(root: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in root.glob("openvino-*/*") if d.is_dir()}


def test_a_second_start_reads_the_compiled_shapes(openvino_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "tiny-openvino"
    shutil.copytree(openvino_bundle, bundle)
    cache = tmp_path / "compiled"
    plain = Pipeline.load(bundle, engine="openvino", threads=1).generate(**ARGS)
    first = Pipeline.load(bundle, engine="openvino", threads=1, compile_cache=True, cache=cache).generate(**ARGS)
    stored = _blobs(cache)
    assert {name.rsplit("-", 1)[0] for name in stored} == {"text_encoder", "unet", "vae_decoder"}
    assert all(files for files in stored.values()), stored
    second = Pipeline.load(bundle, engine="openvino", threads=1, compile_cache=True, cache=cache).generate(**ARGS)
    assert _blobs(cache) == stored, "the second start compiled again instead of reading the blobs"
    assert psnr(first, plain) == float("inf") and psnr(second, plain) == float("inf")

    # A re-exported UNet (here: its weights file touched) gets a folder of its own.
    weights = bundle / "unet" / "openvino_model.bin"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    Pipeline.load(bundle, engine="openvino", threads=1, compile_cache=True, cache=cache).generate(**ARGS)
    unets = [name for name in _blobs(cache) if name.startswith("unet-")]
    assert len(unets) == 2


def test_onnxruntime_keeps_nothing(onnx_bundle: Path, tmp_path: Path) -> None:
    Pipeline.load(onnx_bundle, engine="onnxruntime", threads=1, compile_cache=True,
                  cache=tmp_path / "c").generate(**ARGS)
    assert not (tmp_path / "c").exists()
