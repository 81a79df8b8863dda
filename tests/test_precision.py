"""Speed variants against our fp32 path, with the PSNR they cost: OpenVINO bf16 math (its own default on CPUs with
AVX512-BF16/AMX) and static-shape recompiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.bench.metrics import psnr
from runtime import Pipeline, T2IError

ARGS = {"prompt": "a red fox", "steps": 4, "seed": 11, "width": 256, "height": 256, "guidance": 7.5}


def test_openvino_bf16_close_to_fp32(openvino_bundle: Path) -> None:
    fp32 = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=2, precision="fp32")
    bf16 = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=2, precision="bf16")
    score = psnr(bf16.generate(**ARGS), fp32.generate(**ARGS))
    print(f"OpenVINO bf16 vs fp32: PSNR {score:.1f} dB")
    assert score >= 30


@pytest.mark.parametrize("asked", ["auto", "bf16", "fp32"])
def test_math_precision_follows_the_cpu(openvino_bundle: Path, asked: str) -> None:
    # The rule, on any CPU: bf16 math only where the CPU has it natively (OpenVINO lists BF16 among its
    # capabilities: AMX or AVX512-BF16), and then for auto too; fp32 is always f32.
    import openvino as ov

    native = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    pipe = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=1, precision=asked)
    assert pipe.math_precision == ("bf16" if native and asked != "fp32" else "f32")


def test_static_shapes_recompile_per_size(openvino_bundle: Path) -> None:
    pipe = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=2, precision="fp32",
                         static_shapes="true")
    a = pipe.generate(**ARGS)
    b = pipe.generate(**{**ARGS, "width": 320, "height": 256})
    c = pipe.generate(**ARGS)
    assert b[0].size == (320, 256)
    assert psnr(a, c) == float("inf"), "going back to a size must give the same pixels"


def test_bf16_needs_openvino(onnx_bundle: Path) -> None:
    with pytest.raises(T2IError, match="precision 'bf16' needs the openvino engine"):
        Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", precision="bf16")
    with pytest.raises(T2IError, match="precision 'int3' is not known; use one of auto, fp32, bf16"):
        Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", precision="int3")


def test_int8_export_against_fp32(tiny_source: Path, openvino_bundle: Path, tmp_path: Path) -> None:
    import json

    from exporters.export import export_model

    out = export_model(str(tiny_source), "openvino", tmp_path / "int8", precision="int8", say=lambda _: None)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["quantization"]["unet"] == "int8 weights and activations"
    assert manifest["quantization"]["calibration_samples"] == 16
    xml = (out / "unet" / "openvino_model.xml").read_text()
    assert "FakeQuantize" in xml or "FakeConvert" in xml, "the UNet carries quantization nodes"
    int8 = Pipeline.load(out, device="cpu", engine="openvino", threads=2, precision="fp32")
    fp32 = Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=2, precision="fp32")
    score = psnr(int8.generate(**ARGS), fp32.generate(**ARGS))
    print(f"OpenVINO int8 vs fp32: PSNR {score:.1f} dB")
    assert 20 <= score < float("inf")


def test_static_shapes_auto_is_decided_by_the_cpu(tmp_path: Path, openvino_bundle: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    # The rule on any CPU: per-shape compiles where the CPU lists AMX, one compile for every shape elsewhere; the
    # load's log line says which and why.
    import logging

    from runtime.engines.openvino import cpu_flags, static_by_default, static_shapes_on

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) >= {"amx_tile", "avx2"}
    assert static_by_default(cpu_flags(info)) is True
    assert static_by_default(frozenset({"avx2", "avx512f", "avx512_bf16"})) is False
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert static_shapes_on("true") is True and static_shapes_on("false") is False
    assert static_shapes_on("auto") is static_by_default()
    with pytest.raises(T2IError, match="static_shapes 'sometimes' is not known; use auto, true or false"):
        static_shapes_on("sometimes")  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="runtime.pipeline"):
        Pipeline.load(openvino_bundle, device="cpu", engine="openvino", threads=1)
    how = "compiled per image size and batch" if static_by_default() else "compiled once for every image size"
    assert f"{how} (this CPU has {'' if static_by_default() else 'no '}AMX)" in caplog.text


def test_bf16_math_keeps_the_timestep(openvino_bundle: Path) -> None:
    # bf16 keeps 8 significant bits: a graph fed 999 and 1000 saw the same timestep and gave the same output. The
    # timestep's projection runs in f32 beside the bf16 graph, so the two differ and 999 lands nearer the fp32 result.
    import numpy as np
    import openvino as ov

    from runtime.engines.openvino import OvSession, openvino_math_precision
    from runtime.engines.timestep import split_timestep

    graph = openvino_bundle / "unet" / "openvino_model.xml"
    rng = np.random.default_rng(0)
    base = {"sample": rng.standard_normal((1, 4, 32, 32), dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32), dtype=np.float32)}
    feeds = {t: {**base, "timestep": np.array(t, dtype=np.float32)} for t in (999.0, 1000.0)}
    ours = OvSession(graph, 1, "bf16", static_shapes="false")
    exact = OvSession(graph, 1, "fp32", static_shapes="false").run(feeds[999.0])[0]
    assert not np.array_equal(ours.run(feeds[999.0])[0], ours.run(feeds[1000.0])[0])
    assert split_timestep(ov.Core().read_model(openvino_bundle / "vae_decoder" / "openvino_model.xml")) is None
    if openvino_math_precision("bf16") != "bf16":
        return  # no native bf16 on this CPU: OpenVINO computes in f32 and nothing is rounded
    plain = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "bf16",
                                                         "INFERENCE_NUM_THREADS": 1}).create_infer_request()
    plain_out = {t: np.array(plain.infer(f)[0], copy=True) for t, f in feeds.items()}
    assert np.array_equal(plain_out[999.0], plain_out[1000.0]), "the whole graph in bf16 rounds 999 to 1000"

    def error(out: np.ndarray) -> float:
        return float(np.sqrt(np.mean((out - exact) ** 2) / np.mean(exact**2)))

    print(f"bf16 UNet against fp32 at t=999: whole graph {error(plain_out[999.0]):.4f}, "
          f"projection in f32 {error(ours.run(feeds[999.0])[0]):.4f}")
    assert error(ours.run(feeds[999.0])[0]) < error(plain_out[999.0])


def test_bf16_math_keeps_the_unets_last_convolution_in_f32(openvino_bundle: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # The prediction was written by a bf16 convolution: 8 significant bits, which guidance then multiplies (7.5x for
    # the difference of two predictions). That convolution now runs in f32 beside the bf16 graph.
    import numpy as np
    import openvino as ov

    import runtime.engines.openvino as engine
    from runtime.engines.output_conv import split_output_conv

    graph = openvino_bundle / "unet" / "openvino_model.xml"
    assert split_output_conv(ov.Core().read_model(openvino_bundle / "text_encoder" / "openvino_model.xml")) is None
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 32, 32), dtype=np.float32), "timestep": np.array(500.0, np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    exact = engine.OvSession(graph, 1, "fp32", static_shapes="false").run(feeds)[0]
    ours = engine.OvSession(graph, 1, "bf16", static_shapes="false").run(feeds)[0]
    assert ours.shape == exact.shape == (2, 4, 32, 32)
    if engine.openvino_math_precision("bf16") != "bf16":
        assert np.array_equal(ours, exact), "no native bf16: OpenVINO computes in f32 and nothing is split"
        return
    monkeypatch.setattr(engine, "split_output_conv", lambda model: None)
    whole = engine.OvSession(graph, 1, "bf16", static_shapes="false").run(feeds)[0]

    def error(out: np.ndarray) -> float:  # of the guided difference, where the rounding is multiplied
        return float(np.sqrt(np.mean(((out[1] - out[0]) - (exact[1] - exact[0])) ** 2)))

    print(f"bf16 UNet, guided difference against fp32: last convolution in bf16 {error(whole):.5f}, in f32 "
          f"{error(ours):.5f}")
    assert error(ours) < error(whole)
