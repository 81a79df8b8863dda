"""Rows of the adversarial review (issue #11) fixed at the depth where they belong: text validated once where it
enters, bundle paths kept inside the bundle, the task store private, the CLI checking its output folder first."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from backend.cli import cli
from backend.tasks import task_input
from runtime import Bundle, BundleError, InvalidRequest, Pipeline
from runtime.request import GenerationRequest


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_lone_surrogate_is_refused_where_it_enters(field: str) -> None:
    # Row 1: JSON "\ud800x" decodes to a lone surrogate that no UTF-8 store or reply can hold.
    args = {"prompt": "a fox", field: "\ud800x"}
    with pytest.raises(InvalidRequest, match=r"holds a character that is not text \(a lone surrogate at position 0\)"):
        GenerationRequest(**args)
    key = {"prompt": "input", "negative_prompt": "negative_prompt"}[field]
    with pytest.raises(InvalidRequest, match="lone surrogate"):
        task_input.parse({"input": "a fox", "numberOfImages": 1, key: "\ud800x"})


def _damaged(onnx_bundle: Path, tmp_path: Path, files: object) -> Path:
    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "b"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "files": files}))
    return bundle


@pytest.mark.parametrize("listed", ["../../../../etc/passwd", "/etc/passwd", "unet/../../outside"])
def test_a_manifest_cannot_point_outside_the_bundle(onnx_bundle: Path, tmp_path: Path, listed: str) -> None:
    # Row 11: the loader followed such paths (and its error disclosed the outside file's size; verify hashed it).
    bundle = _damaged(onnx_bundle, tmp_path, {listed: {"size": 1, "sha256": "0" * 64}})
    with pytest.raises(BundleError, match="which is not a file inside the bundle") as caught:
        Bundle.open(bundle)
    assert "bytes" not in str(caught.value)


def test_a_symlink_out_of_the_bundle_is_refused(onnx_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the bundle")
    bundle = _damaged(onnx_bundle, tmp_path, {"tokenizer/extra.txt": {"size": 18, "sha256": "0" * 64}})
    (bundle / "tokenizer" / "extra.txt").symlink_to(outside)
    with pytest.raises(BundleError, match=r"holds 'tokenizer/extra\.txt', a link to outside the bundle"):
        Bundle.open(bundle)


@pytest.mark.parametrize(("files", "config", "message"), [
    (["unet/model.onnx"], None, "'files' must be an object"),
    (None, "[" * 100_000, "cannot be read as JSON"),
    (None, " " * (5 * 1024 * 1024), "is over 4 MB"),
])
def test_damaged_bundle_files_give_messages_not_tracebacks(onnx_bundle: Path, tmp_path: Path, files: object,
                                                           config: str | None, message: str) -> None:
    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "b"))
    if files is not None:
        bundle = _damaged(onnx_bundle, tmp_path / "f", files)
    if config is not None:
        (bundle / "manifest.json").unlink()
        (bundle / "unet" / "config.json").write_text(config)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle)


def test_a_scaling_factor_that_is_no_number(onnx_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(onnx_bundle, tmp_path / "b"))
    (bundle / "manifest.json").unlink()
    config = json.loads((bundle / "vae_decoder" / "config.json").read_text())
    (bundle / "vae_decoder" / "config.json").write_text(json.dumps({**config, "scaling_factor": "abc"}))
    with pytest.raises(BundleError, match="scaling_factor 'abc' is not a number"):
        Pipeline.load(bundle, device="cpu", engine="onnxruntime", threads=1)


def test_the_task_store_is_private(tmp_path: Path) -> None:
    # Row 9: tasks.sqlite3 and the images were world-readable.
    from backend.standalone.store import DB_NAME, TaskStore

    store = TaskStore(tmp_path / "data")
    try:
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "data" / DB_NAME).stat().st_mode) & 0o077 == 0
    finally:
        store.close()


def test_generate_checks_its_output_folder_before_any_work(tmp_path: Path) -> None:
    # Row 10: a read-only --out gave a traceback after the generation had run.
    target = tmp_path / "file"
    target.write_text("a file, not a folder")
    result = CliRunner().invoke(cli, ["generate", "a fox", "--model", "sd-turbo", "--offline",
                                      "--out", str(target / "out")])
    assert result.exit_code == 1 and "cannot be created" in result.output and "Traceback" not in result.output
    assert "is not in the local store" not in result.output, "refused before the model was looked up"
    result = CliRunner().invoke(cli, ["generate", "", "--model", "sd-turbo", "--offline", "--out", str(tmp_path)])
    assert "the prompt is empty" in result.output


def test_a_known_model_name_is_not_a_folder_of_the_working_directory(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Row 12: T2I_MODEL=tiny with a folder ./tiny in the working directory took that folder for the model.
    from backend.model_store import resolve_model

    (tmp_path / "sd-turbo").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as caught:
        resolve_model("sd-turbo", tmp_path / "store", "onnx", offline=True, say=lambda _: None)
    assert "offline mode is on" in str(caught.value)
    assert resolve_model("./sd-turbo", tmp_path / "store", "onnx", offline=True) == Path("./sd-turbo")
    assert os.path.isdir("sd-turbo")


def test_a_diffusers_folder_is_converted_into_the_store_once(tiny_source: Path, tmp_path: Path) -> None:
    # T2I_MODEL=<a diffusers checkpoint folder> failed with "bundle ... has no UNet graph", while the message for
    # `tiny` in the lean image says to point at a diffusers folder or a bundle.
    from backend.model_store import _is_bundle, resolve_model

    said: list[str] = []
    bundle = resolve_model(str(tiny_source), tmp_path / "store", "onnx", offline=True, say=said.append)
    assert bundle.parent == tmp_path / "store" and _is_bundle(bundle) and (bundle / "manifest.json").is_file()
    assert any("converting the diffusers checkpoint" in line for line in said)
    said.clear()
    assert resolve_model(str(tiny_source), tmp_path / "store", "onnx", offline=True, say=said.append) == bundle
    assert said == [], "converted once"


def test_the_watermark_marks_the_corner_and_leaves_the_metadata(onnx_bundle: Path) -> None:
    # Issue #12: the official app stamps "Generated using Artificial Intelligence" into every image.
    import io

    import numpy as np
    from PIL import Image
    from standalone_helpers import load_service

    service = load_service(onnx_bundle)
    request = GenerationRequest(prompt="a fox", steps=1, seed=3)
    plain = service.run(request)[0].png
    service.settings = service.settings.updated(watermark=True)
    marked = service.run(request)[0].png
    a, b = (np.asarray(Image.open(io.BytesIO(p)).convert("RGB"), dtype=np.int16) for p in (plain, marked))
    h, w = a.shape[:2]
    corner = (slice(h - h // 8, h), slice(0, w // 2))
    assert np.abs(a[corner] - b[corner]).mean() > 10, "the mark is visible in the bottom-left corner"
    assert np.array_equal(a[: h // 2], b[: h // 2]), "the rest of the image is untouched"
    assert Image.open(io.BytesIO(plain)).text == Image.open(io.BytesIO(marked)).text, "same metadata"


def test_images_are_lossless_pngs_written_at_the_fast_zlib_level(onnx_bundle: Path) -> None:
    # PIL's default level 6 took 61 ms per 512² photograph where level 1 takes 18 ms (backend.images.PNG_LEVEL).
    import io
    import struct

    import numpy as np
    from PIL import Image
    from standalone_helpers import load_service

    from backend.images import DIGITAL_SOURCE_TYPE

    service = load_service(onnx_bundle)
    request = GenerationRequest(prompt="a fox", steps=1, seed=3)
    png = service.run(request)[0].png
    pixels = np.asarray(service.pipeline.generate("a fox", steps=1, seed=3)[0])  # type: ignore[union-attr]
    decoded = Image.open(io.BytesIO(png))
    assert np.array_equal(np.asarray(decoded.convert("RGB")), pixels), "PNG keeps every pixel"
    assert decoded.text["seed"] == "3" and DIGITAL_SOURCE_TYPE in decoded.text["XML:com.adobe.xmp"]
    # The first IDAT chunk starts with the zlib header, whose FLEVEL bits say which level wrote it: 0 = fastest.
    at = 8
    while png[at + 4:at + 8] != b"IDAT":
        at += 12 + struct.unpack(">I", png[at:at + 4])[0]
    flg = png[at + 9]
    assert flg >> 6 == 0, f"zlib FLEVEL {flg >> 6}: not the fastest level"
