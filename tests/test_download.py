"""``--model org/name`` through the real huggingface_hub download path, against a fake hub on 127.0.0.1.

Nothing of ours or of huggingface_hub is mocked: ``text2image generate`` runs in a subprocess whose HF_ENDPOINT
points at :mod:`fake_hub` (huggingface_hub reads the endpoint at import time), with its own HF_HOME and model store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import CHECKPOINT_NEEDED, FakeHub, sd2_layout

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--steps", "1", "--size", "256x256", "--seed", "1", "--device", "cpu", "--engine", "onnxruntime")
HOW_TO = ("On a machine with access run `text2image export {model} --out DIR`, copy DIR here and pass --model DIR "
          "(or put it at the store path above); to check the installation without a model, use --model tiny "
          "(a random test model)")


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A fresh fake hub per test on a free port, so request logs never mix."""
    fake = FakeHub().start()
    yield fake
    fake.stop()


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _closed_port() -> int:
    """A loopback port nobody listens on: bound once by us, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def text2image(home: Path, endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a user would, with only this test's hub, HF_HOME and store visible to it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "T2I_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1", HF_HOME=str(home / "hf"),
               HF_HUB_DISABLE_PROGRESS_BARS="1", T2I_MODEL_STORE=str(home / "store"))
    code = "from backend.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def _generate(home: Path, endpoint: str, model: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return text2image(home, endpoint, "generate", "a fox", "--model", model, *FAST, "--out", str(out), *extra)


def _assert_png(result: subprocess.CompletedProcess[str], out: Path) -> bytes:
    assert result.returncode == 0, result.stderr
    png = out / "t2i-1.png"
    assert result.stdout.strip() == str(png)
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return data


def test_bundle_repo_is_downloaded_once_then_used_from_the_store(
        hub: FakeHub, onnx_bundle: Path, tmp_path: Path) -> None:
    """A ready-made bundle on the hub is fetched file by file into the store; later runs never ask the hub again."""
    repo = hub.add_repo("org/tiny-bundle", onnx_bundle)
    first = _generate(tmp_path, hub.url, "org/tiny-bundle", tmp_path / "out1")
    png = _assert_png(first, tmp_path / "out1")

    assert hub.requests[0] == "GET /api/models/org/tiny-bundle?blobs=True", "one listing with sizes and sha256"
    assert all(f"/resolve/{repo.sha}/" in r or r.startswith("GET /cdn-lfs/") for r in hub.requests[1:])
    assert hub.files_sent("org/tiny-bundle") == _files(onnx_bundle), "every bundle file once, nothing else"
    downloaded = tmp_path / "store" / "downloads" / "org--tiny-bundle"
    assert (downloaded / "unet" / "model.onnx").read_bytes() == (onnx_bundle / "unet" / "model.onnx").read_bytes()
    assert f"model {downloaded} (onnx, fp32) on onnxruntime/cpu" in first.stderr

    seen = len(hub.requests)
    second = _generate(tmp_path, hub.url, "org/tiny-bundle", tmp_path / "out2")  # hub still up: a call would show
    assert _assert_png(second, tmp_path / "out2") == png, "same bundle and seed, same image"
    assert hub.requests[seen:] == [], "a bundle already in the store must not be looked up again"

    hub.stop()
    offline = _generate(tmp_path, hub.url, "org/tiny-bundle", tmp_path / "out3", "--offline")
    assert _assert_png(offline, tmp_path / "out3") == png


def test_diffusers_repo_is_downloaded_and_exported(hub: FakeHub, tiny_source: Path, tmp_path: Path) -> None:
    """A diffusers checkpoint is fetched (configs, tokenizer, the fp16 weights, not the other copies real SD2 repos
    hold), exported into the store, and the manifest records the hub id and the commit it came from."""
    repo = hub.add_repo("org/tiny-diffusers", sd2_layout(tiny_source, tmp_path / "repo"))

    result = _generate(tmp_path, hub.url, "org/tiny-diffusers", tmp_path / "out")
    _assert_png(result, tmp_path / "out")
    assert hub.files_sent("org/tiny-diffusers") == CHECKPOINT_NEEDED
    target = tmp_path / "store" / "org--tiny-diffusers-onnx"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["source"] == {"id": "org/tiny-diffusers", "revision": repo.sha, "kind": "hub"}
    assert manifest["format"] == "onnx"
    assert f"exported {tmp_path / 'store' / 'downloads' / 'org--tiny-diffusers'} → {target} (onnx, fp32)" in (
        result.stderr)
    assert f"model {target} (onnx, fp32) on onnxruntime/cpu" in result.stderr
    assert not (tmp_path / "store" / "downloads" / "org--tiny-diffusers").exists(), "the checkpoint is removed"


def _assert_clear_failure(result: subprocess.CompletedProcess[str], model: str, store: Path, why: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    target = store / f"{model.replace('/', '--')}-onnx"
    expected = (f"Error: model '{model}' is not in the local store ({target}) and cannot be fetched: "
                f"download of '{model}' failed ({why}")
    assert expected in result.stderr
    assert HOW_TO.format(model=model) in result.stderr
    assert not (store / "downloads").exists(), "nothing half-downloaded is left behind"


def test_unknown_repo_says_download_failed_and_how_to_get_a_model(hub: FakeHub, tmp_path: Path) -> None:
    """The hub answers 401 RepoNotFound to an anonymous client: one clear error line, exit code 1."""
    result = _generate(tmp_path, hub.url, "org/missing", tmp_path / "out")
    _assert_clear_failure(result, "org/missing", tmp_path / "store",
                          "no such repository on the hub, or it is private and needs a token")
    assert hub.requests == ["GET /api/models/org/missing?blobs=True"]
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_says_download_failed_and_how_to_get_a_model(tmp_path: Path) -> None:
    """No server on the endpoint (offline machine, firewall): the same clear error, quickly, no retries loop."""
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = _generate(tmp_path, endpoint, "org/tiny-bundle", tmp_path / "out")
    _assert_clear_failure(result, "org/tiny-bundle", tmp_path / "store", "cannot reach the model hub at http://127.0.0.1:")
    assert "Connection refused" in result.stderr


def test_download_reports_progress(hub: FakeHub, onnx_bundle: Path, tmp_path: Path) -> None:
    """The fraction of files fetched reaches the caller (the ExApp turns it into its init status)."""
    hub.add_repo("org/tiny-bundle", onnx_bundle)
    code = ("import json; from pathlib import Path; from backend.model_store import resolve_model; seen = []; "
            f"resolve_model('org/tiny-bundle', Path({str(tmp_path / 'store')!r}), 'onnx', say=print, "
            "progress=seen.append); print(json.dumps(seen))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "T2I_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) >= 2
