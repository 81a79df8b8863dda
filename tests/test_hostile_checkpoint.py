"""A damaged or hostile diffusers checkpoint (safetensors headers, configs, tensor shapes, NaN weights) is refused
with one line naming the file and what is wrong, before or instead of a traceback; a bundle may not hold a link
that leads out of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from backend.cli import cli

UNET = "unet/diffusion_pytorch_model.safetensors"


def _raw(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file's bytes: header length, header, data."""
    text = json.dumps(header).encode()
    return (len(text) if length is None else length).to_bytes(8, "little") + text + data


def _f32(shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


def _export(src: Path, out: Path, converter: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", str(src), "--format", "onnx", "--out", str(out),
                                      "--converter", converter])
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output.strip().splitlines()[-1]


def _copy(tiny_source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_source, tmp_path / "ckpt"))


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[:-10]


SAFETENSORS = {
    "empty": (lambda p: b"", "it has 0 bytes, fewer than the 8 of the header length"),
    "header length 2^63": (lambda p: _raw({}, length=2 ** 63), "its header length 9,223,372,036,854,775,808 is over"),
    "header a list": (lambda p: _raw([]), "its header must be a JSON object, found a list"),
    "header not JSON": (lambda p: b"\x05\0\0\0\0\0\0\0{oops", "its header is not JSON"),
    "offsets out of range": (lambda p: _raw({"w": _f32([2], 0, 8)}, b"\0" * 4),
                             "tensor 'w' has the data_offsets [0, 8], not inside the 4 data bytes"),
    "offsets overlap": (lambda p: _raw({"a": _f32([2], 0, 8), "b": _f32([2], 4, 12)}, b"\0" * 12),
                        "tensor 'b' at bytes 4-12 overlaps the tensor before it"),
    "size not the shape's": (lambda p: _raw({"w": _f32([3], 0, 8)}, b"\0" * 8),
                             "tensor 'w' (F32 [3]) needs 12 bytes, its offsets span 8"),
    "unknown dtype": (lambda p: _raw({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"),
                      "tensor 'w' has the dtype 'Q4'"),
    "truncated": (_truncated, "not inside the"),
}


@pytest.mark.parametrize("converter", ["template", "torch"])
@pytest.mark.parametrize("case", sorted(SAFETENSORS))
def test_a_damaged_safetensors_file_is_refused_naming_it(tiny_source: Path, tmp_path: Path, case: str,
                                                         converter: str) -> None:
    src = _copy(tiny_source, tmp_path)
    make, why = SAFETENSORS[case]
    (src / UNET).write_bytes(make(src / UNET))
    code, line = _export(src, tmp_path / "out", converter)
    assert code == 1
    assert line.startswith(f"Error: {src / UNET} is not a valid safetensors file: ")
    assert why in line


CONFIGS = {
    "a list": ("unet/config.json", "[1, 2]", "must hold a JSON object, found a list"),
    "a string": ("unet/config.json", '"unet"', "must hold a JSON object, found a str"),
    "not JSON": ("unet/config.json", "{oops", "is not JSON"),
    "100,000 [": ("unet/config.json", "[" * 100_000, "is not JSON"),
    "over 4 MB": ("unet/config.json", json.dumps({"x": "a" * (5 << 20)}), "is over 4,194,304 bytes"),
    "model_index a list": ("model_index.json", "[]", "must hold a JSON object, found a list"),
    "scheduler config a number": ("scheduler/scheduler_config.json", "7", "must hold a JSON object, found a int"),
}


@pytest.mark.parametrize("converter", ["template", "torch"])
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_a_bad_config_is_refused_naming_it(tiny_source: Path, tmp_path: Path, case: str, converter: str) -> None:
    src = _copy(tiny_source, tmp_path)
    rel, text, why = CONFIGS[case]
    (src / rel).write_text(text)
    code, line = _export(src, tmp_path / "out", converter)
    assert code == 1
    assert line.startswith(f"Error: checkpoint file {src / rel} ") and why in line
    assert len(line) < 1000


def test_a_huge_config_value_is_not_echoed_whole(tiny_source: Path, tmp_path: Path) -> None:
    # A config field the templates do not cover was quoted whole in the refusal (209 MB of error message).
    src = _copy(tiny_source, tmp_path)
    config = json.loads((src / "unet" / "config.json").read_text())
    (src / "unet" / "config.json").write_text(json.dumps({**config, "cross_attention_dim": "x" * (3 << 20)}))
    code, line = _export(src, tmp_path / "out", "template")
    assert code == 1
    assert 'unet.cross_attention_dim: "xxxxxxxx' in line and "… (3,145,730 characters) (template: 32)" in line
    assert len(line) < 1000


def test_nan_weights_are_refused_naming_the_file_and_tensor(tiny_source: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    src = _copy(tiny_source, tmp_path)
    tensors = load_file(str(src / UNET))
    tensors["conv_in.bias"][0] = np.nan
    save_file(tensors, str(src / UNET))
    code, line = _export(src, tmp_path / "out", "template")
    assert code == 1
    assert line == f"Error: {src / UNET}: tensor conv_in.bias holds NaN or infinite values; the checkpoint is damaged"


@pytest.mark.parametrize(("key", "shape"), [("down_blocks.0.resnets.0.time_emb_proj.weight", (128, 32)),
                                            ("conv_in.weight", (32 * 4 * 3 * 3,))])
def test_a_tensor_of_another_shape_is_refused(tiny_source: Path, tmp_path: Path, key: str,
                                              shape: tuple[int, ...]) -> None:
    # The same element count in another shape (transposed, flattened) used to be reshaped and run scrambled.
    from safetensors.numpy import load_file, save_file

    src = _copy(tiny_source, tmp_path)
    tensors = load_file(str(src / UNET))
    expected = list(tensors[key].shape)
    tensors[key] = np.ascontiguousarray(tensors[key].T if len(shape) == 2 else tensors[key]).reshape(shape)
    save_file(tensors, str(src / UNET))
    code, line = _export(src, tmp_path / "out", "template")
    assert code == 1
    assert line == (f"Error: {src / UNET}: tensor {key} has the shape {list(shape)}, the tiny unet expects "
                    f"{expected}")


def test_the_safetensors_checks_accept_the_real_files(tiny_source: Path) -> None:
    # The checks are not so strict that the files the libraries write fail them.
    from exporters.checkpoint_files import CheckpointError, read_header, read_json

    for path in sorted(tiny_source.glob("*/*.safetensors")):
        assert read_header(path)
    assert read_json(tiny_source / "unet" / "config.json")["_class_name"] == "UNet2DConditionModel"
    with pytest.raises(CheckpointError, match="is missing"):
        read_json(tiny_source / "nothing.json")


def test_verify_refuses_an_unlisted_link_out_of_the_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    # An optional graph the manifest does not list (taesd_decoder/) was loaded and verified through a link.
    secret = tmp_path / "secret"
    secret.write_text("root:x:0:0\n")
    (bundle_copy / "taesd_decoder").mkdir()
    (bundle_copy / "taesd_decoder" / "model.onnx").symlink_to(secret)
    result = CliRunner().invoke(cli, ["verify", str(bundle_copy)])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: bundle '{bundle_copy}' holds 'taesd_decoder/model.onnx', a link to "
                                     "outside the bundle; a bundle's files must be its own")
    assert "root:x" not in result.output


def test_a_link_inside_the_bundle_is_allowed(bundle_copy: Path) -> None:
    (bundle_copy / "tokenizer" / "alias.json").symlink_to(bundle_copy / "tokenizer" / "vocab.json")
    result = CliRunner().invoke(cli, ["verify", str(bundle_copy)])
    assert result.exit_code == 0, result.output
