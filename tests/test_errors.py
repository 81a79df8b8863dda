"""Bad input gets a clear error that names the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from backend.cli import cli
from runtime import Pipeline, T2IError


def cli_error(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def pipe(onnx_bundle: Path) -> Pipeline:
    return Pipeline.load(onnx_bundle, device="cpu", engine="onnxruntime", threads=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": 500}, "width 500 is not allowed; use a multiple of 64 from 256 to 1024"),
        ({"height": 1088}, "height 1088 is not allowed; use a multiple of 64 from 256 to 1024"),
        ({"width": 192}, "width 192 is not allowed"),
        ({"n": 0}, "number of images 0 is out of range; use 1 to 12"),
        ({"n": 13}, "number of images 13 is out of range; use 1 to 12"),
        ({"steps": 0}, "steps 0 is out of range; use 1 to 100"),
        ({"steps": 101}, "steps 101 is out of range; use 1 to 100"),
        ({"scheduler": "plms"}, "scheduler 'plms' is not known; use one of euler, dpm++2m, dpm++2m-karras, ddim"),
        ({"guidance": float("nan")}, "guidance nan is not a finite number"),
        ({"seed": -1}, "seed -1 is out of range"),
    ],
)
def test_generate_rejects(pipe: Pipeline, kwargs: dict, message: str) -> None:
    with pytest.raises(T2IError) as err:
        pipe.generate("a fox", **kwargs)
    assert message in str(err.value)


def test_cli_size_errors(onnx_bundle: Path) -> None:
    out = cli_error("generate", "x", "--model", str(onnx_bundle), "--size", "500x500")
    assert "width 500 is not allowed; use a multiple of 64 from 256 to 1024" in out
    out = cli_error("generate", "x", "--model", str(onnx_bundle), "--size", "abc")
    assert "size 'abc' is not of the form WIDTHxHEIGHT" in out
    assert "number of images 13 is out of range; use 1 to 12" in cli_error(
        "generate", "x", "--model", str(onnx_bundle), "-n", "13")
    assert "steps 1000 is out of range; use 1 to 100" in cli_error(
        "generate", "x", "--model", str(onnx_bundle), "--steps", "1000")
    assert "scheduler 'foo' is not known" in cli_error(
        "generate", "x", "--model", str(onnx_bundle), "--scheduler", "foo", "--steps", "1")


def test_missing_file(bundle_copy: Path) -> None:
    (bundle_copy / "vae_decoder" / "model.onnx").unlink()
    out = cli_error("generate", "x", "--model", str(bundle_copy))
    assert "is missing vae_decoder/model.onnx" in out


def test_truncated_file(bundle_copy: Path) -> None:
    graph = bundle_copy / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    out = cli_error("generate", "x", "--model", str(bundle_copy))
    assert "bundle file unet/model.onnx has 1000 bytes but manifest.json lists" in out
    assert "truncated" in out


def test_truncated_file_without_manifest(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    graph = bundle_copy / "unet" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    with pytest.raises(T2IError, match=r"onnxruntime could not load .*model.onnx.*truncated or corrupt"):
        Pipeline.load(bundle_copy, device="cpu", engine="onnxruntime")


def test_engine_format_mismatch(openvino_bundle: Path) -> None:
    out = cli_error("generate", "x", "--model", str(openvino_bundle), "--engine", "onnxruntime")
    assert "engine 'onnxruntime' needs an ONNX bundle (model.onnx files) but this bundle is openvino" in out


def test_cuda_without_gpu(onnx_bundle: Path) -> None:
    from runtime.engines import cuda_usable

    if cuda_usable():
        pytest.skip("this machine has a usable GPU")
    out = cli_error("generate", "x", "--model", str(onnx_bundle), "--device", "cuda")
    assert "device 'cuda' was asked for but CUDA is not usable here" in out


def test_unknown_devices(onnx_bundle: Path) -> None:
    assert "device 'gpu' is not known; use one of auto, cpu, cuda or cuda:N" in cli_error(
        "generate", "x", "--model", str(onnx_bundle), "--device", "gpu")
    assert "device 'cuda:x' is not known; use auto, cpu, cuda or cuda:N" in cli_error(
        "generate", "x", "--model", str(onnx_bundle), "--device", "cuda:x")


def test_not_a_bundle(tmp_path: Path) -> None:
    out = cli_error("generate", "x", "--model", str(tmp_path))
    assert "is not a model bundle: model_index.json is missing" in out


def test_bad_threads(onnx_bundle: Path) -> None:
    out = cli_error("generate", "x", "--model", str(onnx_bundle), "--threads", "0")
    assert "threads 0 is out of range; use a whole number from 1 to 1024" in out


def test_an_unsupported_scheduler_config_fails_at_load(onnx_bundle: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from runtime import BundleError, Pipeline

    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "b"))
    (bundle / "manifest.json").unlink()
    config_file = bundle / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "sample"}))
    with pytest.raises(BundleError, match=r"scheduler/scheduler_config.json cannot drive the ddim scheduler: "
                                          r".*prediction_type='sample' is not supported"):
        Pipeline.load(bundle, device="cpu", engine="onnxruntime", threads=1)


def test_cancellation_is_no_error() -> None:
    from runtime import GenerationCancelled, T2IError

    assert not issubclass(GenerationCancelled, T2IError), "handlers of T2IError must not swallow a cancel"


@pytest.mark.parametrize(("driver", "built", "problem"), [
    ((12, 2), ("1.31.1", 13), "the NVIDIA driver supports CUDA 12.2 only, but onnxruntime-gpu 1.31.1 needs CUDA 13"),
    ((13, 0), ("1.31.1", 13), None),
    ((12, 8), ("1.26.0", 12), None),
    (None, ("1.26.0", 12), None),
])
def test_info_says_when_the_driver_is_too_old(monkeypatch: pytest.MonkeyPatch, driver: object, built: object,
                                              problem: str | None) -> None:
    # The CUDA probe's answers injected: what `text2image info` says on a host with that driver (issue #12).
    import json

    import runtime.engines.cuda as cuda

    monkeypatch.setattr(cuda, "cuda_driver_version", lambda: driver)
    monkeypatch.setattr(cuda, "onnxruntime_cuda_major", lambda: built)
    result = CliRunner().invoke(cli, ["info", "--json"])
    said = json.loads(result.output)["cuda_driver"]
    if problem is None:
        assert said.startswith("no problem found"), said
    else:
        assert said.startswith(problem) and "update the host's NVIDIA driver" in said, said
