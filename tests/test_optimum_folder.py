"""Folders other tools write load unchanged: plain `optimum-cli export onnx|openvino --task text-to-image` (no
manifest) generate; onnxruntime's CUDA-fused fp16 pipeline is refused on the CPU with the way out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from runtime import Bundle, Pipeline, T2IError


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


ARGS = {"prompt": "a red fox", "n": 1, "steps": 3, "seed": 5, "width": 256, "height": 256}
#: Each weight format against our fp32 OpenVINO bundle of the same weights: the least it must keep (measured on
#: the tiny model: fp32 90 dB, fp16 62 dB, int8 52 dB).
OPTIMUM_INTEL_FLOOR = {"fp32": 40.0, "fp16": 30.0, "int8": 20.0}


@pytest.mark.parametrize("weight_format", list(OPTIMUM_INTEL_FLOOR))
def test_optimum_intel_openvino_folder(tiny_source: Path, openvino_bundle: Path, tmp_path: Path,
                                       weight_format: str) -> None:
    # What FastSD CPU and rupeshs/sd-turbo-openvino ship: optimum-intel's OpenVINO layout, here made with the tool.
    pytest.importorskip("optimum.intel", reason="optimum-intel (the dev extra) makes the reproduction")
    out = tmp_path / f"ov-{weight_format}"
    cli = Path(sys.executable).with_name("optimum-cli")
    cmd = [str(cli), "export", "openvino", "--model", str(tiny_source), "--task", "text-to-image",
           "--weight-format", weight_format, str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Bundle.open(out).format == "openvino" and not (out / "manifest.json").exists()
    theirs = Pipeline.load(out, device="cpu", threads=2, precision="fp32")
    assert theirs.engine == "openvino"
    ours = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=2, precision="fp32")
    score = psnr(theirs.generate(**ARGS), ours.generate(**ARGS))
    print(f"optimum-intel {weight_format} vs our OpenVINO fp32: PSNR {score:.1f} dB")
    assert score >= OPTIMUM_INTEL_FLOOR[weight_format]


def test_onnxruntime_cuda_pipeline_is_refused_on_the_cpu(onnx_bundle: Path, tmp_path: Path) -> None:
    # onnxruntime's own fp16 recipe (what onnxruntime/sd-turbo ships): NhwcConv, GroupNorm … have no CPU kernels.
    out = tmp_path / "ort-cuda"
    cmd = [sys.executable, "-m", "onnxruntime.transformers.models.stable_diffusion.optimize_pipeline",
           "-i", str(onnx_bundle), "-o", str(out), "--float16"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    with pytest.raises(T2IError, match=r"unet/model.onnx uses com\.microsoft\.\w+, a fused op that onnxruntime runs "
                                       r"on CUDA only: .* load it with --device cuda"):
        Pipeline.load(out, device="cpu", threads=1)
