"""The GPU code path, as far as it runs without a GPU: IOBinding with reused buffers (the same code runs on the
CPU provider), onnxruntime's graph fusions at export (the CPU set runs here and is compared with the plain graph;
the CUDA set is checked for what it contains and for fp32 attention in upcast models), and the guards that keep
CUDA-only bundles and options off the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.bench.metrics import psnr
from exporters.onnx_graphs import CUDA_ONLY_OPS
from runtime import Pipeline
from runtime.engines import OrtSession
from runtime.errors import T2IError

ARGS = {"prompt": "a red fox", "n": 2, "steps": 3, "width": 256, "height": 256, "seed": 11}


def _unet_feeds(rng: np.random.Generator, batch: int, side: int, dim: int) -> dict[str, np.ndarray]:
    return {
        "sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
        "timestep": np.array(rng.uniform(1, 999), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, dim), dtype=np.float32),
    }


def test_io_binding_matches_plain_runs_across_calls_and_shapes(onnx_bundle: Path) -> None:
    graph = onnx_bundle / "unet" / "model.onnx"
    plain = OrtSession(graph, "cpu", 2, io_binding=False)
    bound = OrtSession(graph, "cpu", 2, io_binding=True)
    dim = int(plain.inputs["encoder_hidden_states"].shape[-1])
    rng = np.random.default_rng(0)
    outputs = []
    # New values every call (stale device buffers would repeat the first result), then a new shape and back.
    for batch, side in ((2, 16), (2, 16), (2, 16), (1, 8), (2, 16)):
        feeds = _unet_feeds(rng, batch, side, dim)
        want = plain.run(feeds)[0]
        got = bound.run(feeds)[0]
        assert got.shape == want.shape == (batch, 4, side, side)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        outputs.append(got)
    assert not np.allclose(outputs[0], outputs[1]), "two different inputs gave the same output"
    assert len(bound._bound) == 2, "each shape must get one binding, reused afterwards"


def test_io_binding_results_are_not_overwritten_by_the_next_call(onnx_bundle: Path) -> None:
    bound = OrtSession(onnx_bundle / "vae_decoder" / "model.onnx", "cpu", 2, io_binding=True)
    rng = np.random.default_rng(1)
    first = bound.run({"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)})[0]
    kept = first.copy()
    bound.run({"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)})
    bound.run({"latent_sample": rng.standard_normal((1, 4, 8, 8), dtype=np.float32)})
    np.testing.assert_array_equal(first, kept)


def test_cuda_graph_needs_a_cuda_device(onnx_bundle: Path) -> None:
    with pytest.raises(T2IError, match="CUDA graphs need"):
        OrtSession(onnx_bundle / "unet" / "model.onnx", "cpu", 1, cuda_graph=True)
    with pytest.raises(T2IError, match="CUDA graphs need --device cuda"):
        Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", cuda_graph=True)


def _export(source: Path, out: Path, precision: str, fusions: str) -> Path:
    from exporters.export import export_model

    return export_model(str(source), "onnx", out, precision=precision, say=lambda _: None, fusions=fusions)


def _ops(graph: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(graph), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _attention_layers(source: Path) -> int:
    """Self- plus cross-attention layers of the UNet: 2 per transformer block."""
    config = json.loads((source / "unet" / "config.json").read_text())
    blocks = sum(1 for b in config["down_block_types"] if "CrossAttn" in b) * config["layers_per_block"]
    blocks += sum(1 for b in config["up_block_types"] if "CrossAttn" in b) * (config["layers_per_block"] + 1)
    blocks += 1  # the mid block
    return 2 * blocks


def test_cpu_fusions_generate_the_same_images(tiny_source: Path, onnx_bundle: Path, tmp_path: Path) -> None:
    fused = _export(tiny_source, tmp_path / "fused", "fp32", "cpu")
    manifest = json.loads((fused / "manifest.json").read_text())
    assert manifest["request"]["fusions"] == "cpu"
    ops = _ops(fused / "unet" / "model.onnx")
    attention = ops.get("MultiHeadAttention", 0) + ops.get("Attention", 0)
    assert attention == _attention_layers(tiny_source), ops
    assert "SkipLayerNormalization" in ops
    assert not set(CUDA_ONLY_OPS) & set(ops), "CUDA-only ops in a CPU export"
    a = Pipeline.load(fused, device="cpu", engine="onnxruntime").generate(**ARGS)
    b = Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime").generate(**ARGS)
    other = Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime").generate(**{**ARGS, "seed": 12})
    assert psnr(a, b) >= 50, psnr(a, b)
    assert psnr(a, other) < 30, "the comparison cannot tell images apart"


def test_cuda_fusions_fp16_with_fp32_attention_for_upcast_models(tiny_v_source: Path, tmp_path: Path) -> None:
    import onnx

    bundle = _export(tiny_v_source, tmp_path / "cuda", "fp16", "cuda")
    unet = bundle / "unet" / "model.onnx"
    ops = _ops(unet)
    for op in ("GroupNorm", "NhwcConv", "BiasSplitGelu", "MultiHeadAttention"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert ops["MultiHeadAttention"] == _attention_layers(tiny_v_source)
    model = onnx.load(str(unet))
    onnx.checker.check_model(model)
    floats = {i.name: i.data_type for i in model.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in floats.values(), "weights were not converted to fp16"
    # The fused attention of an upcast_attention model reads fp32: each of its inputs comes from a Cast to fp32.
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "MultiHeadAttention":
            for name in node.input[:3]:
                if name:
                    src = producers[name]
                    to = next((a.i for a in src.attribute if a.name == "to"), None)
                    assert src.op_type == "Cast" and to == onnx.TensorProto.FLOAT, (node.name, src.op_type)
    assert json.loads((bundle / "manifest.json").read_text())["request"]["fusions"] == "cuda"
    with pytest.raises(T2IError, match="--device cuda only"):
        Pipeline.load(bundle, device="auto", engine="auto")


def test_fusions_need_onnx(tiny_source: Path, tmp_path: Path) -> None:
    from exporters.export import ExportError, export_model

    with pytest.raises(ExportError, match="use --format onnx"):
        export_model(str(tiny_source), "openvino", tmp_path / "x", say=lambda _: None, fusions="cuda")
    with pytest.raises(ExportError, match="fusions 'gpu' is not known; use one of none, cpu, cuda"):
        export_model(str(tiny_source), "onnx", tmp_path / "y", say=lambda _: None, fusions="gpu")
