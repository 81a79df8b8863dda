"""A hostile model hub: the repository an admin names (T2I_MODEL, the admin form's list) may list any file names and
sizes and serve other bytes. Whatever it does, nothing is written outside the model store, no file larger than
announced is fetched, and the refusal is one short line naming the file, through the real huggingface_hub client
against :mod:`fake_hub`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, sd2_layout

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/hostile"
UNET_FP16 = "unet/diffusion_pytorch_model.fp16.safetensors"
#: Runs resolve_model as the ExApp and the CLI do; prints the bundle or the T2IError, and how much the peak
#: memory grew past what the imports took.
RESOLVE = """
import json, resource, sys
from pathlib import Path
import huggingface_hub, exporters.export, exporters.hub
from backend.model_store import resolve_model
from runtime.errors import T2IError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    out = {"path": str(resolve_model(sys.argv[1], Path(sys.argv[2]), "onnx", say=lambda _: None))}
except T2IError as exc:
    out = {"error": str(exc)}
out["grew_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
print(json.dumps(out))
"""


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    fake = FakeHub().start()
    yield fake
    fake.stop()


def _resolve(hub: FakeHub, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "T2I_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    done = subprocess.run([sys.executable, "-c", RESOLVE, REPO, str(tmp_path / "store")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _tree(root: Path, skip: tuple[str, ...] = ("store", "hf")) -> set[str]:
    """Every file and folder under ``root``, except the store and the hub client's home."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.relative_to(root).parts[0] not in skip}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_store_clean(tmp_path: Path) -> None:
    store = tmp_path / "store"
    assert not store.exists() or sorted(p.name for p in store.iterdir()) == [], sorted(store.rglob("*"))


@pytest.mark.parametrize("served", [True, False], ids=["served", "404"])
@pytest.mark.parametrize(("kind", "folder"), [("bundle", "unet"), ("checkpoint", "tokenizer")])
def test_a_listed_name_that_climbs_out_is_refused_before_any_download(
        hub: FakeHub, onnx_bundle: Path, tiny_source: Path, tmp_path: Path, kind: str, folder: str,
        served: bool) -> None:
    # Such a name was written where it pointed, outside the store, and the model loaded; answered with a 404 it
    # still left its folder and a .lock there.
    files = _files(onnx_bundle) if kind == "bundle" else _files(sd2_layout(tiny_source, tmp_path / "layout"))
    outside = tmp_path / "outside"
    name = f"{folder}/{'../' * 16}{outside.as_posix().lstrip('/')}/pwned.json"
    hub.add_files(REPO, {**files, name: b'{"pwned": true}'}, missing=[] if served else [name])
    before = _tree(tmp_path)

    got = _resolve(hub, tmp_path)
    assert got.get("error", "").startswith(f"'{REPO}' lists the file '{folder}/../../"), got
    assert "which has a '..' part; a repository file name must be a plain relative path" in got["error"]
    assert hub.files_sent(REPO) == [], "nothing is downloaded from such a repository"
    assert not outside.exists()
    assert _tree(tmp_path) == before, "nothing (file, folder, .lock) appeared outside the store"
    _assert_store_clean(tmp_path)


@pytest.mark.parametrize(("name", "why"), [
    ("/etc/cron.d/x", "starts with '/'"), ("unet\\..\\..\\x.json", "holds a backslash"),
    ("unet/a\0b.json", "holds a control character"), ("unet/a\nb.json", "holds a control character"),
    ("unet/../x.json", "has a '..' part"), ("..", "has a '..' part"), ("unet//x.json", "has an empty or '.' part"),
    ("./x.json", "has an empty or '.' part"), ("", "is empty"),
    (".partial/unet/x.json", "lies in .partial/, where downloads grow"),
])
def test_names_that_are_not_plain_relative_paths_are_refused(name: str, why: str) -> None:
    from exporters.hub import HubError, check_name

    with pytest.raises(HubError) as caught:
        check_name(REPO, name)
    assert f"'{REPO}' lists the file {name!r}, which {why}" in str(caught.value)
    check_name(REPO, "unet/diffusion_pytorch_model.fp16.safetensors")  # a real name passes


def test_weights_larger_than_announced_are_not_downloaded(hub: FakeHub, tiny_source: Path, tmp_path: Path) -> None:
    # The room check and the progress trust the listing; a weight file announced at 1 kB was fetched whole.
    files = _files(sd2_layout(tiny_source, tmp_path / "layout"))
    hub.add_files(REPO, files, announced={UNET_FP16: 1024})
    got = _resolve(hub, tmp_path)
    assert got.get("error") == (f"'{UNET_FP16}' from '{REPO}' is listed at 1,024 bytes but the hub announces "
                                f"{len(files[UNET_FP16]):,} bytes; it is not downloaded"), got
    assert UNET_FP16 not in hub.files_sent(REPO)
    _assert_store_clean(tmp_path)


@pytest.mark.parametrize("announced", [900, None], ids=["announced-900-bytes", "announced-truly"])
def test_an_oversize_config_is_refused_unread_in_one_short_line(hub: FakeHub, tiny_source: Path, tmp_path: Path,
                                                                announced: int | None) -> None:
    # A 200 MB unet/config.json announced at 900 bytes was read whole and echoed whole into the error.
    files = _files(sd2_layout(tiny_source, tmp_path / "layout"))
    config = json.loads(files["unet/config.json"])
    files["unet/config.json"] = json.dumps({**config, "cross_attention_dim": "x" * (6 << 20)}).encode()
    size = len(files["unet/config.json"])
    hub.add_files(REPO, files, announced={"unet/config.json": announced} if announced else {})
    got = _resolve(hub, tmp_path)
    error = got.get("error", "")
    if announced:
        assert error == (f"'unet/config.json' from '{REPO}' is listed at 900 bytes but the hub announces {size:,} "
                         "bytes; it is not downloaded"), got
    else:
        assert error == (f"'{REPO}' lists 'unet/config.json' at {size:,} bytes; a config file is at most "
                         "4,194,304 bytes, so it is not downloaded"), got
    assert len(error) < 1000
    assert got["grew_kb"] < 100 * 1024, f"peak memory grew by {got['grew_kb']} kB"
    assert "unet/config.json" not in hub.files_sent(REPO)
    _assert_store_clean(tmp_path)


@pytest.mark.parametrize("missing", ["unet/config.json", UNET_FP16])
def test_a_listed_file_that_answers_404_is_named(hub: FakeHub, tiny_source: Path, tmp_path: Path,
                                                 missing: str) -> None:
    hub.add_files(REPO, _files(sd2_layout(tiny_source, tmp_path / "layout")), missing=[missing])
    got = _resolve(hub, tmp_path)
    assert got.get("error") == (f"'{missing}' from '{REPO}' cannot be downloaded: the hub answers 404 "
                                "(EntryNotFoundError)"), got
    _assert_store_clean(tmp_path)


def test_weights_that_grow_past_the_announced_size_are_refused(hub: FakeHub, tiny_source: Path,
                                                               tmp_path: Path) -> None:
    # The listing and the HEAD answer agree, then the body runs on: the download stops at the announced size.
    files = _files(sd2_layout(tiny_source, tmp_path / "layout"))
    hub.add_files(REPO, files)
    hub.faults[(REPO, UNET_FP16)] = ["grow"]
    got = _resolve(hub, tmp_path)
    assert got.get("error") == (f"'{UNET_FP16}' from '{REPO}' sends more than the {len(files[UNET_FP16]):,} bytes it "
                                "announced; the download was stopped there and the file is not used"), got
    _assert_store_clean(tmp_path)


@pytest.mark.parametrize(("rel", "text", "why"), [
    ("model_index.json", b"[]", "must hold a JSON object, found a list ('[]')"),
    ("unet/config.json", b"[" * 100_000, "is not JSON: 'maximum recursion depth exceeded"),
])
def test_a_config_that_is_no_object_is_refused_before_the_weights(hub: FakeHub, tiny_source: Path, tmp_path: Path,
                                                                  rel: str, text: bytes, why: str) -> None:
    # A model_index.json that is a list used to fail only after the weights were fetched and converted.
    files = _files(sd2_layout(tiny_source, tmp_path / "layout"))
    hub.add_files(REPO, {**files, rel: text})
    got = _resolve(hub, tmp_path)
    assert f"/{rel} {why}" in got.get("error", ""), got
    assert len(got["error"]) < 1000
    assert not [p for p in hub.files_sent(REPO) if p.endswith(".safetensors")]
    _assert_store_clean(tmp_path)


def test_a_damaged_weight_file_from_the_hub_is_named_and_leaves_no_bundle(hub: FakeHub, tiny_source: Path,
                                                                          tmp_path: Path) -> None:
    files = _files(sd2_layout(tiny_source, tmp_path / "layout"))
    hub.add_files(REPO, {**files, UNET_FP16: files[UNET_FP16][:-10]})
    got = _resolve(hub, tmp_path)
    assert f"/{UNET_FP16} is not a valid safetensors file: " in got.get("error", ""), got
    _assert_store_clean(tmp_path)


def test_nan_weights_from_the_hub_fail_the_check_and_leave_no_bundle(hub: FakeHub, tiny_source: Path,
                                                                     tmp_path: Path) -> None:
    # The failed export check was raised as nothing the store caught: a traceback, and the half bundle stayed.
    import numpy as np
    from safetensors.numpy import load_file, save_file

    layout = sd2_layout(tiny_source, tmp_path / "layout")
    tensors = load_file(str(layout / UNET_FP16))
    tensors["conv_in.bias"][:] = np.nan
    save_file(tensors, str(layout / UNET_FP16))
    hub.add_files(REPO, _files(layout))
    got = _resolve(hub, tmp_path)
    assert "NaN or infinite values" in got.get("error", ""), got
    assert "\n" not in got["error"] and len(got["error"]) < 1000
    _assert_store_clean(tmp_path)


def test_the_cli_says_one_line_for_a_hostile_repo(hub: FakeHub, onnx_bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    hub.add_files(REPO, {**_files(onnx_bundle), f"unet/{'../' * 16}{outside.as_posix().lstrip('/')}/x.json": b"{}"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "T2I_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"),
               T2I_MODEL_STORE=str(tmp_path / "store"))
    done = subprocess.run([sys.executable, "-c", "from backend.cli import main; main()", "generate", "a fox",
                           "--model", REPO, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "lists the file 'unet/../../" in errors[0] and len(errors[0]) < 1000, done.stderr
    assert not outside.exists() and not (tmp_path / "out").exists()
    _assert_store_clean(tmp_path)
