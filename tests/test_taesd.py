"""The optional TAESD decoder: exported beside the VAE, chosen at load time, equal to diffusers with the same
weights, and refused clearly where a bundle lacks it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from exporters.export import export_model
from runtime import Pipeline, T2IError


@pytest.fixture(scope="module")
def taesd_bundle(tiny_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("taesd") / "bundle"
    return export_model(str(tiny_source), "onnx", out, say=lambda _: None, taesd="tiny")


def test_taesd_matches_diffusers(taesd_bundle: Path, tiny_source: Path, tmp_path: Path) -> None:
    import diffusers
    import torch

    from exporters.taesd import build_random_taesd

    pipe = Pipeline.load(taesd_bundle, device="cpu", engine="onnxruntime", threads=2, decoder="taesd")
    latents = np.random.default_rng(3).standard_normal((1, 4, 32, 32), dtype=np.float32)
    ours = pipe.generate("a red fox", steps=3, guidance=7.5, scheduler="euler", latents=latents,
                         width=256, height=256)
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None,
                                                                 requires_safety_checker=False)
    ref_pipe.vae = diffusers.AutoencoderTiny.from_pretrained(build_random_taesd(tmp_path / "t", tiny=True))
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe("a red fox", height=256, width=256, num_inference_steps=3, guidance_scale=7.5,
                   latents=torch.from_numpy(latents), output_type="np").images
    score = psnr(ours, (ref * 255).round().astype(np.uint8))
    print(f"TAESD vs diffusers: PSNR {score:.1f} dB")
    assert score >= 40
    vae = Pipeline.load(taesd_bundle, device="cpu", engine="onnxruntime", threads=2, decoder="vae")
    other = vae.generate("a red fox", steps=3, guidance=7.5, scheduler="euler", latents=latents, width=256,
                         height=256)
    assert psnr(other, ours) < 30, "the VAE path must not be using the TAESD decoder"


def test_bundle_without_taesd(onnx_bundle: Path) -> None:
    with pytest.raises(T2IError, match=r"has no taesd decoder \(taesd_decoder/\)"):
        Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", decoder="taesd")
    with pytest.raises(T2IError, match="decoder 'fast' is not known; use one of vae, taesd"):
        Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", decoder="fast")
