"""SDXS-512 (one step, distilled from sd-turbo; TAESD as its VAE) on the tiny random model of its layout: our
runtime against diffusers' StableDiffusionPipeline with the AutoencoderTiny VAE, the torch-free converter against
the torch export, and the refusal of a config its template does not cover."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from exporters.export import ExportError, export_model
from runtime import Pipeline

PROMPT = "a red fox in the snow"
SIZE = (256, 256)
N = 2
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}


@pytest.fixture(scope="module")
def sdxs_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from exporters.tiny import build_tiny_sdxs_model

    return build_tiny_sdxs_model(tmp_path_factory.mktemp("src") / "tiny-sdxs")


@pytest.fixture(scope="module")
def sdxs_bundles(sdxs_source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The torch export in both formats."""
    root = tmp_path_factory.mktemp("bundles")
    return {fmt: export_model(str(sdxs_source), fmt, root / fmt, converter="torch", say=lambda _: None)
            for fmt in ENGINES}


def _reference(source: Path, steps: int, latents: np.ndarray) -> list[np.ndarray]:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(source, safety_checker=None,
                                                             requires_safety_checker=False)
    assert type(pipe.vae).__name__ == "AutoencoderTiny"
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, height=SIZE[1], width=SIZE[0], num_inference_steps=steps, guidance_scale=0.0,
               num_images_per_prompt=N, latents=torch.from_numpy(latents), output_type="np").images
    return list((out * 255).round().astype(np.uint8))


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("fmt", list(ENGINES))
def test_matches_diffusers_with_its_tiny_vae(sdxs_source: Path, sdxs_bundles: dict[str, Path], fmt: str,
                                             steps: int) -> None:
    pipe = Pipeline.load(sdxs_bundles[fmt], device="cpu", engine=ENGINES[fmt], threads=2, precision="fp32")
    # What the bundle says, not assumed: TAESD's latents are unscaled and its decoder upsamples 8×.
    assert pipe.bundle.vae_scaling_factor == 1.0 and pipe.bundle.vae_scale_factor == 8
    assert json.loads((sdxs_bundles[fmt] / "model_index.json").read_text())["vae_decoder"][1] == "AutoencoderTiny"
    rng = np.random.default_rng(123)
    latents = rng.standard_normal((N, 4, SIZE[1] // 8, SIZE[0] // 8), dtype=np.float32)
    ours = pipe.generate(PROMPT, n=N, width=SIZE[0], height=SIZE[1], steps=steps, guidance=0.0, scheduler="euler",
                         latents=latents)
    ref = _reference(sdxs_source, steps, latents)
    score = psnr(ours, ref)
    print(f"SDXS {fmt} {steps} step(s): PSNR {score:.1f} dB against diffusers")
    assert score >= 40.0
    # The check can fail: other starting noise gives images well under the bar (the tiny random TAESD draws
    # low-contrast images, so "well under" is about 30 dB here, not the SD2 tests' 20s).
    other = pipe.generate(PROMPT, n=N, width=SIZE[0], height=SIZE[1], steps=steps, guidance=0.0, scheduler="euler",
                          seed=99)
    assert psnr(other, ref) < 35.0


def test_tiny_sdxs_templates_are_current(sdxs_source: Path, tmp_path: Path) -> None:
    # As the tiny SD2 templates: what the build makes today, proved against a second torch export in the build.
    from exporters.dev.template_build import build_templates, stale_files
    from exporters.graph_template import TEMPLATES

    built = build_templates(sdxs_source, "tiny-sdxs", root=tmp_path, say=lambda _: None)
    assert not stale_files(built, TEMPLATES / "tiny-sdxs"), "stale: run scripts/build_templates.py tiny-sdxs"


@pytest.mark.parametrize("fmt", list(ENGINES))
def test_the_template_conversion_gives_the_torch_exports_images(sdxs_source: Path, sdxs_bundles: dict[str, Path],
                                                                fmt: str, tmp_path: Path) -> None:
    out = export_model(str(sdxs_source), fmt, tmp_path / "b", converter="template", say=lambda _: None)
    assert json.loads((out / "manifest.json").read_text())["converter"] == "template"
    assert json.loads((out / "model_index.json").read_text())["vae_decoder"][1] == "AutoencoderTiny"
    args = {"prompt": PROMPT, "steps": 1, "guidance": 0.0, "seed": 4, "width": 256, "height": 256, "n": N}
    images = [Pipeline.load(b, device="cpu", engine=ENGINES[fmt], threads=2, precision="fp32").generate(**args)
              for b in (out, sdxs_bundles[fmt])]
    score = psnr(*images)
    print(f"SDXS template vs torch export, {fmt}: PSNR {score:.1f} dB")
    assert score >= 60


@pytest.mark.parametrize(("component", "change", "named"), [
    ("unet", {"only_cross_attention": [False, False]},
     "unet.only_cross_attention: [false, false] (template: [true, false])"),
    ("unet", {"mid_block_type": "UNetMidBlock2DCrossAttn"},
     'unet.mid_block_type: "UNetMidBlock2DCrossAttn" (template: null)'),
    ("vae", {"num_decoder_blocks": [3, 3, 3, 1]},
     "vae_decoder.num_decoder_blocks: [3, 3, 3, 1] (template: [1, 1, 1, 1])"),
])
def test_a_config_the_template_does_not_cover_is_refused_by_name(sdxs_source: Path, tmp_path: Path, component: str,
                                                                 change: dict, named: str) -> None:
    other = Path(shutil.copytree(sdxs_source, tmp_path / "other"))
    config = json.loads((other / component / "config.json").read_text())
    (other / component / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ExportError) as caught:
        export_model(str(other), "onnx", tmp_path / "b", converter="template", say=lambda _: None)
    message = str(caught.value)
    assert named in message, message
    assert "closest: tiny-sdxs" in message and "SDXS-512" in message
    assert not (tmp_path / "b" / "unet").exists(), "nothing is written for a refused checkpoint"


def test_a_taesd_config_saved_without_its_block_out_channels_is_covered(sdxs_source: Path) -> None:
    # AutoencoderTiny adds block_out_channels in its __init__; a config written without it means the same decoder.
    from exporters.convert import checkpoint_configs
    from exporters.graph_template import select

    configs = checkpoint_configs(sdxs_source)
    del configs["vae_decoder"]["block_out_channels"]
    assert select(configs)["vae_decoder"].architecture == "tiny-sdxs"


def test_the_catalogue_name_becomes_a_provider_with_one_step_defaults(sdxs_source: Path, tmp_path: Path) -> None:
    from standalone_helpers import load_service

    from backend.catalog import export_args, lookup
    from backend.nextcloud.provider import build_provider

    source, defaults = export_args("sdxs-512")
    assert source == "IDKiro/sdxs-512-0.9" and lookup(source) == lookup("sdxs-512")
    assert defaults == {"steps": 1, "guidance": 0.0, "scheduler": "euler"}
    # The bundle the store would make of the hub checkpoint, here from the tiny model of its layout.
    bundle = export_model(str(sdxs_source), "onnx", tmp_path / "b", converter="template", defaults=defaults,
                          say=lambda _: None)
    provider = build_provider("sdxs-512", load_service(bundle))
    assert provider.id == "text2image_sd2:sdxs-512"
    assert {k: provider.optional_input_shape_defaults[k] for k in ("steps", "guidance", "scheduler")} == defaults


def test_the_download_takes_the_tiny_vae_and_leaves_the_large_one() -> None:
    # The hub repository also holds the original AutoencoderKL as vae_large/; the bundle's decoder is vae/'s TAESD.
    from exporters.hub import Listing, RemoteFile

    names = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
             *(f"{folder}/config.json" for folder in ("text_encoder", "unet", "vae", "vae_large")),
             "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
             "vae/diffusion_pytorch_model.safetensors", "vae_large/diffusion_pytorch_model.safetensors"]
    listing = Listing("IDKiro/sdxs-512-0.9", "0" * 40, {n: RemoteFile(n, 10) for n in names})
    fetched = [f.path for f in listing.checkpoint_small_files() + listing.checkpoint_weights()]
    assert "vae/diffusion_pytorch_model.safetensors" in fetched
    assert not [p for p in fetched if p.startswith("vae_large/")], fetched


def test_the_int8_export_against_the_fp32_path(sdxs_source: Path, sdxs_bundles: dict[str, Path],
                                               tmp_path: Path) -> None:
    # The int8 lever (weights and calibrated activations) on SDXS's layout: its pixel cost against fp32 math.
    int8 = export_model(str(sdxs_source), "openvino", tmp_path / "int8", precision="int8", say=lambda _: None)
    assert json.loads((int8 / "manifest.json").read_text())["precision"] == "int8"
    args = {"prompt": PROMPT, "steps": 1, "guidance": 0.0, "seed": 3, "width": SIZE[0], "height": SIZE[1]}
    exact = Pipeline.load(sdxs_bundles["openvino"], device="cpu", engine="openvino", threads=2, precision="fp32")
    score = psnr(Pipeline.load(int8, device="cpu", engine="openvino", threads=2).generate(**args),
                 exact.generate(**args))
    print(f"SDXS int8 vs fp32: PSNR {score:.1f} dB")
    assert 30 <= score < float("inf"), score
