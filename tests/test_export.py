"""The exporters: manifest contents, fp16 variants, resuming, and refusing to mix exports in one folder."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from backend.bench.metrics import psnr
from exporters.export import STATE, ExportError, export_model
from runtime import Bundle, Pipeline


def test_manifest_lists_every_file(onnx_bundle: Path, tiny_source: Path) -> None:
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    on_disk = {p.relative_to(onnx_bundle).as_posix() for p in onnx_bundle.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {"manifest.json"}
    for rel, meta in manifest["files"].items():
        data = (onnx_bundle / rel).read_bytes()
        assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["format"] == "onnx" and manifest["precision"] == "fp32"
    assert manifest["source"]["id"] == str(tiny_source.resolve())
    assert set(manifest["check_errors"]) == {"text_encoder", "unet", "vae_decoder"}
    assert all(err < 1e-3 for err in manifest["check_errors"].values())
    index = json.loads((onnx_bundle / "model_index.json").read_text())
    assert "vae_decoder" in index and "vae" not in index and "_name_or_path" not in index


@pytest.mark.parametrize(("fmt", "engine"), [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_fp16_export_generates_close_to_fp32(tiny_source: Path, onnx_bundle: Path, tmp_path: Path, fmt: str,
                                             engine: str) -> None:
    out = export_model(str(tiny_source), fmt, tmp_path / "fp16", precision="fp16", say=lambda _: None)
    bundle = Bundle.open(out)
    assert bundle.precision == "fp16"
    fp16 = Pipeline.load(out, device="cpu", engine=engine, threads=2)
    fp32 = Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", threads=2)
    args = {"prompt": "a red fox", "steps": 3, "seed": 4, "width": 256, "height": 256}
    score = psnr(fp16.generate(**args), fp32.generate(**args))
    print(f"{fmt} fp16 vs fp32: PSNR {score:.1f} dB")
    assert score >= 30


def test_fp16_keeps_upcast_attention_in_fp32(tiny_v_source: Path, tmp_path: Path) -> None:
    import onnx

    out = export_model(str(tiny_v_source), "onnx", tmp_path / "v16", precision="fp16", say=lambda _: None)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(out / "unet" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in graph.graph.value_info}
    softmax = [n.output[0] for n in graph.graph.node if n.op_type == "Softmax" and "/attn" in n.name]
    convs = [n.output[0] for n in graph.graph.node if n.op_type == "Conv"]
    assert softmax, "the UNet has attention softmax nodes"
    assert {types[o] for o in softmax} == {onnx.TensorProto.FLOAT}, "attention must stay fp32"
    assert {types[o] for o in convs} == {onnx.TensorProto.FLOAT16}, "the rest runs in fp16"


def test_resume_skips_finished_components(tiny_source: Path, onnx_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(onnx_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").unlink()
    state = {"request": manifest["request"], "done": {"text_encoder": 1e-7, "unet": 2e-7}}
    (out / STATE).write_text(json.dumps(state))
    said: list[str] = []
    export_model(str(tiny_source), "onnx", out, say=said.append)
    assert any(s.startswith("text_encoder: already exported and checked") for s in said)
    assert any(s.startswith("unet: already exported and checked") for s in said)
    assert not any(s.startswith("vae_decoder: already") for s in said)
    assert (out / "manifest.json").is_file() and not (out / STATE).exists()
    assert Bundle.open(out).verify_hashes() == []


def test_refuses_a_folder_holding_another_export(tiny_source: Path, onnx_bundle: Path, tmp_path: Path) -> None:
    out = Path(shutil.copytree(onnx_bundle, tmp_path / "x"))
    with pytest.raises(ExportError, match="already holds a different export"):
        export_model(str(tiny_source), "openvino", out, say=lambda _: None)


def test_bad_format_and_precision(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="format 'tflite' is not known; use one of onnx, openvino"):
        export_model("tiny", "tflite", tmp_path)
    with pytest.raises(ExportError, match="precision 'int4' is not known; use one of fp32, fp16, int8"):
        export_model("tiny", "onnx", tmp_path, precision="int4")
    with pytest.raises(ExportError, match="is not a folder, a hub id"):
        export_model("nonsense", "onnx", tmp_path / "y")
