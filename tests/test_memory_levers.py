"""Issue #14's memory levers against the fp32 path, with the pixels they cost: fp16-compressed weights in the
OpenVINO bundle, int8 MatMul weights, the weights file's pages given back once compiled, and one shape-free compile
for every size."""

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
    shared = _load(openvino_bundle, static_shapes="false")
    static = _load(openvino_bundle, static_shapes="true")
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


def test_int8_quantize_restores_each_weight_to_half_a_step() -> None:
    from exporters.weight_int8 import quantize

    rng = np.random.default_rng(3)
    w = rng.standard_normal((48, 40)).astype(np.float32) * rng.uniform(0.01, 3.0, (1, 40)).astype(np.float32)
    w[:, 7] = 0.0  # a channel of zeros must not divide by zero
    w[:, 9] = np.abs(w[:, 9])  # one sign only: zero stays exactly representable
    q, zero, scale = quantize(w, axis=0)
    assert q.dtype == np.uint8 and zero.shape == scale.shape == (1, 40)
    restored = (q.astype(np.float32) - zero) * scale
    assert np.all(np.abs(restored - w) <= scale / 2 + 1e-6)
    assert np.all(restored[:, 7] == 0.0)
    assert np.all((q.astype(np.float32) - zero)[w == 0.0] == 0.0), "zero weights stay zero"


def _matmul_weights(xml: Path) -> dict[str, int]:
    """Of the IR's MatMuls, how many take a float weight constant and how many one made of uint8."""
    import openvino as ov

    from exporters.weight_int8 import float_weight

    counts = {"float": 0, "uint8": 0}
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        if float_weight(op) is not None:
            counts["float"] += 1
        node = op.input_value(1).get_node()
        while node.get_type_name() in ("Multiply", "Subtract", "Convert"):
            node = node.input_value(0).get_node()
        if node.get_type_name() == "Constant" and node.get_element_type().get_type_name() == "u8":
            counts["uint8"] += 1
    return counts


def test_int8_matmul_weights_against_fp32(tiny_source: Path, openvino_bundle: Path, tmp_path: Path) -> None:
    """What the model store exports for OpenVINO on a CPU without AMX (fp16, the MatMul weights of the text encoder
    and the UNet in int8), against the fp32 bundle: every such weight became uint8, the convolutions did not, and
    the pixels barely move."""
    from backend.model_store import store_export
    from exporters.export import export_model

    store = export_model(str(tiny_source), "openvino", tmp_path / "store", say=lambda _: None,
                         **store_export("openvino", frozenset({"avx2", "fma"})))
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["request"]["int8_matmuls"] == "true" and manifest["precision"] == "fp16"
    for name in ("text_encoder", "unet"):
        before = _matmul_weights(openvino_bundle / name / "openvino_model.xml")
        after = _matmul_weights(store / name / "openvino_model.xml")
        assert before["float"] > 0 and before["uint8"] == 0, (name, before)
        assert after == {"float": 0, "uint8": before["float"]}, (name, after)
        assert manifest["weights"][name]["matmuls"] == before["float"]
    assert _matmul_weights(store / "vae_decoder" / "openvino_model.xml")["uint8"] == 0, "the VAE is left alone"
    lean, full = _load(store), _load(openvino_bundle)
    assert lean.bundle.weights == "fp16 (int8 MatMuls: text_encoder, unet)" and full.bundle.weights == "fp32"
    a, b = lean._encode(ARGS["prompt"]), full._encode(ARGS["prompt"])
    cos = float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))
    score = psnr(lean.generate(**ARGS), full.generate(**ARGS))
    print(f"store export (fp16 + int8 MatMuls) vs fp32: text embedding cosine {cos:.6f}, PSNR {score:.1f} dB")
    assert cos >= 0.999, cos
    assert 30 <= score < float("inf"), score


def test_int8_matmul_weights_need_openvino(tiny_source: Path, tmp_path: Path) -> None:
    from exporters.export import ExportError, export_model

    with pytest.raises(ExportError, match="use --format openvino"):
        export_model(str(tiny_source), "onnx", tmp_path / "x", int8_matmuls=True, say=lambda _: None)


def test_on_amx_the_store_keeps_the_unets_matmul_weights_in_fp16(tiny_source: Path, openvino_bundle: Path,
                                                                   tmp_path: Path) -> None:
    """On AMX the int8 MatMul weights cost the UNet about 7 % per step (bf16 kernels decompress them at every call):
    the store compresses the text encoder's only there, and the pixels are at least as close to fp32 as with both."""
    from backend.model_store import store_export
    from exporters.export import ExportError, export_model

    amx = store_export("openvino", frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
    assert amx == {"precision": "fp16", "int8_matmuls": ("text_encoder",)}
    assert store_export("openvino", frozenset({"avx512_bf16"}))["int8_matmuls"] is True, "Zen 5: not measured"
    assert store_export("onnx", frozenset({"amx_tile"})) == {"precision": "fp32"}
    store = export_model(str(tiny_source), "openvino", tmp_path / "store", say=lambda _: None, **amx)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["request"]["int8_matmuls"] == "text_encoder" and list(manifest["weights"]) == ["text_encoder"]
    full = _matmul_weights(openvino_bundle / "unet" / "openvino_model.xml")
    assert _matmul_weights(store / "unet" / "openvino_model.xml") == full, "the UNet's MatMul weights stay float"
    te = _matmul_weights(store / "text_encoder" / "openvino_model.xml")
    assert te["float"] == 0 and te["uint8"] > 0
    lean = _load(store)
    assert lean.bundle.weights == "fp16 (int8 MatMuls: text_encoder)", lean.bundle.weights
    both = _load(export_model(str(tiny_source), "openvino", tmp_path / "both", say=lambda _: None,
                              precision="fp16", int8_matmuls=True))
    reference = _load(openvino_bundle).generate(**ARGS)
    score, both_score = psnr(lean.generate(**ARGS), reference), psnr(both.generate(**ARGS), reference)
    print(f"store export on AMX (int8 MatMuls in the text encoder only) vs fp32: {score:.1f} dB (both: "
          f"{both_score:.1f} dB)")
    assert both_score <= score < float("inf") and score >= 30, (score, both_score)
    with pytest.raises(ExportError, match=r"'vae_decoder'.*not known"):
        export_model(str(tiny_source), "openvino", tmp_path / "x", int8_matmuls=("vae_decoder",), say=lambda _: None)
