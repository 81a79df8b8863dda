"""Our torch-free runtime against diffusers' StableDiffusionPipeline: same weights, same starting latents.

Every scheduler × prediction type × guidance on/off, for onnxruntime (CPU) and OpenVINO (fp32 hint): PSNR ≥ 40 dB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from runtime import Pipeline

PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"
SIZE = (256, 256)
STEPS = 5
N = 2

DIFFUSERS_SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
                        "ddim": "DDIMScheduler"}


def _reference(source: Path, scheduler: str, guidance: float, latents: np.ndarray) -> list[np.ndarray]:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, negative_prompt=NEGATIVE, height=SIZE[1], width=SIZE[0], num_inference_steps=STEPS,
               guidance_scale=guidance, num_images_per_prompt=N, latents=torch.from_numpy(latents),
               output_type="np").images
    return list((out * 255).round().astype(np.uint8))


def _latents(pipe: Pipeline) -> np.ndarray:
    f = pipe.bundle.vae_scale_factor
    rng = np.random.default_rng(123)
    return rng.standard_normal((N, pipe.bundle.latent_channels, SIZE[1] // f, SIZE[0] // f), dtype=np.float32)


@pytest.mark.parametrize("variant", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("scheduler", list(DIFFUSERS_SCHEDULERS))
@pytest.mark.parametrize("guidance", [0.0, 7.5])
def test_matches_diffusers(request: pytest.FixtureRequest, variant: str, engine: str, scheduler: str,
                           guidance: float) -> None:
    v = "_v" if variant == "v_prediction" else ""
    bundle = request.getfixturevalue(f"{'onnx' if engine == 'onnxruntime' else 'openvino'}{v}_bundle")
    source = request.getfixturevalue(f"tiny{v}_source")
    pipe = Pipeline.load(bundle, device="cpu", engine=engine, threads=2, precision="fp32")
    assert pipe.bundle.scheduler_config["prediction_type"] == variant
    latents = _latents(pipe)
    ours = pipe.generate(PROMPT, negative_prompt=NEGATIVE, n=N, width=SIZE[0], height=SIZE[1], steps=STEPS,
                         guidance=guidance, scheduler=scheduler, latents=latents)
    ref = _reference(source, scheduler, guidance, latents)
    assert [im.size for im in ours] == [SIZE] * N
    score = psnr(ours, ref)
    print(f"{engine} {variant} {scheduler} guidance={guidance}: PSNR {score:.1f} dB")
    assert score >= 40.0
    # The check must be able to fail: another seed's images are far from the reference.
    other = pipe.generate(PROMPT, negative_prompt=NEGATIVE, n=N, width=SIZE[0], height=SIZE[1], steps=STEPS,
                          guidance=guidance, scheduler=scheduler, seed=99)
    assert psnr(other, ref) < 30.0
