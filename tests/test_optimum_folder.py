"""A folder written by plain `optimum-cli export onnx --task text-to-image` (no manifest) loads and generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from runtime import Bundle, Pipeline
from runtime.pipeline import psnr


def test_plain_optimum_folder(tiny_source: Path, onnx_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "optimum"
    cli = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(cli), "export", "onnx", "--model", str(tiny_source), "--task", "text-to-image", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (out / "manifest.json").exists()
    bundle = Bundle.open(out)
    assert bundle.manifest is None and bundle.format == "onnx"
    pipe = Pipeline.load(out, device="cpu", engine="onnxruntime", threads=2)
    images = pipe.generate("a red fox", n=1, steps=3, seed=5, width=256, height=256)
    assert images[0].size == (256, 256) and np.asarray(images[0]).std() > 0
    # Same weights, same seed: our own export and optimum's give the same picture.
    ours = Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", threads=2)
    assert psnr(images, ours.generate("a red fox", n=1, steps=3, seed=5, width=256, height=256)) >= 40
