"""The torch-free converter: a diffusers checkpoint bound into the graph templates gives the bundle the torch export
gives, and an architecture no template covers is refused with the fields that differ."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from exporters.export import ExportError, export_model
from exporters.graph_template import TEMPLATES, TemplateError
from runtime import Pipeline

ROOT = Path(__file__).resolve().parents[1]
ARGS = {"prompt": "a red fox", "steps": 3, "seed": 4, "width": 256, "height": 256, "guidance": 7.5}
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}


def _images(bundle: Path, fmt: str) -> list:
    pipe = Pipeline.load(bundle, device="cpu", engine=ENGINES[fmt], threads=2, precision="fp32")
    return pipe.generate(**ARGS)


def test_tiny_templates_are_current(tiny_source: Path, tmp_path: Path) -> None:
    # The shipped templates are what the build makes from the tiny model today, proved against a second torch
    # export inside the build; `python scripts/build_templates.py tiny` rewrites them.
    from exporters.dev.template_build import build_templates, stale_files

    built = build_templates(tiny_source, "tiny", root=tmp_path, say=lambda _: None)
    assert not stale_files(built, TEMPLATES / "tiny"), "stale: run scripts/build_templates.py tiny"


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize("variant", ["epsilon", "v"])
def test_template_bundle_equals_the_torch_bundle(request: pytest.FixtureRequest, variant: str, fmt: str,
                                                 tmp_path: Path) -> None:
    source = request.getfixturevalue("tiny_source" if variant == "epsilon" else "tiny_v_source")
    torch_bundle = request.getfixturevalue(f"{fmt}_bundle" if variant == "epsilon" else f"{fmt}_v_bundle")
    seen: list[float] = []
    out = export_model(str(source), fmt, tmp_path / "b", converter="template", say=lambda _: None,
                       progress=seen.append)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["converter"] == "template"
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0), seen
    score = psnr(_images(out, fmt), _images(torch_bundle, fmt))
    print(f"template vs torch export, {variant} {fmt}: PSNR {score:.1f} dB")
    assert score >= 60


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_fp16_checkpoint_and_fp16_bundle(tiny_source: Path, onnx_bundle: Path, tmp_path: Path, fmt: str) -> None:
    # A checkpoint with only the fp16 weight variant (what the download prefers), made into an fp16 bundle: ONNX
    # fp16 for CUDA, OpenVINO with fp16-compressed weights.
    from safetensors.numpy import load_file, save_file

    half = Path(shutil.copytree(tiny_source, tmp_path / "half"))
    for weights in half.glob("*/*.safetensors"):
        save_file({k: v.astype(np.float16) for k, v in load_file(str(weights)).items()},
                  str(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))))
        weights.unlink()
    out = export_model(str(half), fmt, tmp_path / "b", precision="fp16", converter="template", say=lambda _: None)
    assert json.loads((out / "manifest.json").read_text())["precision"] == "fp16"
    score = psnr(_images(out, fmt), _images(onnx_bundle, "onnx"))
    print(f"fp16 checkpoint → {fmt} fp16 bundle vs fp32 torch export: PSNR {score:.1f} dB")
    assert score >= 30


def test_an_uncovered_architecture_is_refused(tiny_source: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(tiny_source, tmp_path / "other"))
    config = json.loads((other / "unet" / "config.json").read_text())
    config.update(layers_per_block=3, cross_attention_dim=48)
    (other / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as caught:
        export_model(str(other), "onnx", tmp_path / "b", converter="template", say=lambda _: None)
    message = str(caught.value)
    assert "unet.cross_attention_dim: 48 (template: 32)" in message
    assert "unet.layers_per_block: 3 (template: 1)" in message
    assert "text2image-sd2[export]" in message
    assert not (tmp_path / "b" / "unet").exists(), "nothing is written for a refused checkpoint"


def test_keys_an_older_checkpoint_leaves_out_take_the_class_defaults(tiny_source: Path) -> None:
    from exporters.convert import checkpoint_configs
    from exporters.graph_template import select

    configs = checkpoint_configs(tiny_source)
    # diffusers 0.10 wrote neither of these; their defaults are what the template was exported with.
    for key in ("attention_type", "resnet_time_scale_shift"):
        configs["unet"].pop(key)
    assert select(configs)["unet"].architecture == "tiny"
    configs["unet"]["resnet_time_scale_shift"] = "scale_shift"
    with pytest.raises(TemplateError, match=r'unet.resnet_time_scale_shift: "scale_shift" \(template: "default"\)'):
        select(configs)


def test_a_checkpoint_without_safetensors_is_refused(tiny_source: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(tiny_source, tmp_path / "other"))
    (other / "unet" / "diffusion_pytorch_model.safetensors").rename(other / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ExportError, match=r"no diffusion_pytorch_model.safetensors or .*fp16.safetensors"):
        export_model(str(other), "onnx", tmp_path / "b", converter="template", say=lambda _: None)


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'optimum', 'nncf'}:
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_the_cli_converts_without_torch(tiny_v_source: Path, tmp_path: Path, fmt: str) -> None:
    # What an image without the export extra runs: `text2image export <diffusers folder>` picks the templates
    # by itself, and the bundle generates.
    code = _BLOCKER + f"""
from backend.cli import cli
cli(['export', {str(tiny_v_source)!r}, '--format', {fmt!r}, '--out', {str(tmp_path / 'b')!r}], standalone_mode=False)
from runtime import Pipeline
image = Pipeline.load({str(tmp_path / 'b')!r}, device='cpu', threads=1).generate('a fox', steps=2, seed=1)[0]
assert image.size == (256, 256), image.size
blocked = [m for m in sys.modules if m.split('.')[0] in {{'torch', 'diffusers', 'transformers', 'optimum'}}]
assert not blocked, blocked
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["converter"] == "template"
