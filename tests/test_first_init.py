"""An admin's first start on an image without torch: a diffusers checkpoint on the hub becomes a working bundle.

The ExApp and the CLI run in subprocesses in which torch, diffusers, transformers, optimum and NNCF refuse to
import (:mod:`torch_free`), against the fake hub (:mod:`fake_hub`, huggingface_hub unchanged) and, for the ExApp,
the fake Nextcloud. Acceptance 2 and 3 of issue #10.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import CHECKPOINT_NEEDED, FakeHub, sd2_layout
from fake_nextcloud import APP_ID, ExAppProcess, FakeNextcloud
from torch_free import site_dir

from runtime.engines.openvino import has_amx

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny-diffusers"
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture
def hub(tiny_source: Path, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub().start()
    fake.add_repo(REPO, sd2_layout(tiny_source, tmp_path / "repo"))
    yield fake
    fake.stop()


def _hub_env(hub: FakeHub, tmp: Path) -> dict[str, str]:
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HOME": str(tmp / "hf"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "PYTHONPATH": f"{site_dir(tmp)}{os.pathsep}{ROOT}"}


def _cli(hub: FakeHub, tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "T2I_"))}
    clean.update(_hub_env(hub, tmp), T2I_MODEL_STORE=str(tmp / "store"), **env)
    return subprocess.run([sys.executable, "-c", "from backend.cli import main; main()", *args], cwd=tmp, env=clean,
                          capture_output=True, text=True, timeout=600, check=False)


def _generate(hub: FakeHub, tmp: Path, out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return _cli(hub, tmp, "generate", "a fox", "--model", REPO, "--steps", "1", "--size", "256x256", "--seed", "1",
                "--out", str(out), **env)


def _weights_sent(hub: FakeHub, repo: str = REPO) -> list[str]:
    return [p for p in hub.files_sent(repo) if p.endswith(".safetensors")]


def _store_leftovers(store: Path) -> list[str]:
    return sorted(p.relative_to(store).as_posix() for p in store.rglob("*")) if store.exists() else []


def test_exapp_first_init_converts_the_checkpoint(hub: FakeHub, tmp_path: Path) -> None:
    fake = FakeNextcloud(version=32).start()
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": REPO, "T2I_THREADS": "1",
                                                      "T2I_POLL_INTERVAL": "0.2", **_hub_env(hub, tmp_path)})
    try:
        status = fake.install(proc, timeout=300)
        assert status["progress"] == 100 and not status.get("error"), proc.output()[-3000:]
        steps = [s["progress"] for s in fake.init_status]
        assert steps == sorted(steps) and steps[-1] == 100 and len(set(steps)) >= 5, steps
        assert hub.files_sent(REPO) == CHECKPOINT_NEEDED, "configs, tokenizer, one fp16 weight file per component"
        bundles = [p.parent for p in (tmp_path / "storage").rglob("manifest.json")]
        assert len(bundles) == 1, bundles
        manifest = json.loads((bundles[0] / "manifest.json").read_text())
        assert manifest["converter"] == "template"
        # The store's OpenVINO export, made torch-free: fp16 weights, the MatMul weights in int8.
        # The store's per-CPU choice (backend.model_store.store_export): the UNet's MatMul weights stay fp16 on AMX.
        compressed = ["text_encoder"] if has_amx() else ["text_encoder", "unet"]
        assert manifest["precision"] == "fp16" and list(manifest["weights"]) == compressed, manifest
        assert all(manifest["weights"][name]["matmuls"] > 0 for name in compressed), manifest
        assert not list((tmp_path / "storage").rglob("*.safetensors")), "the checkpoint is not kept beside it"
        assert any(p.startswith(f"{APP_ID}:") for p in fake.providers), fake.providers
        tid = fake.schedule({"input": "a red fox", "numberOfImages": 1})
        [task] = fake.wait([tid], timeout=120)
        assert task["status"] == "STATUS_SUCCESSFUL", proc.output()[-3000:]
    finally:
        proc.stop()
        fake.stop()


def _add_uncovered_repo(hub: FakeHub, tiny_source: Path, tmp_path: Path) -> None:
    """Put ``org/other`` on the hub: the tiny checkpoint with a UNet config no template covers."""
    other = sd2_layout(tiny_source, tmp_path / "other")
    config = json.loads((other / "unet" / "config.json").read_text())
    config["cross_attention_dim"] = 48
    (other / "unet" / "config.json").write_text(json.dumps(config))
    hub.add_repo("org/other", other)


def test_exapp_init_refuses_an_uncovered_architecture_before_any_weight(hub: FakeHub, tiny_source: Path,
                                                                        tmp_path: Path) -> None:
    _add_uncovered_repo(hub, tiny_source, tmp_path)
    fake = FakeNextcloud(version=32).start()
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": "org/other", **_hub_env(hub, tmp_path)})
    try:
        t0 = time.monotonic()
        status = fake.install(proc, timeout=60)
        took = time.monotonic() - t0
        assert "unet.cross_attention_dim: 48 (template: 32)" in status["error"], status
        assert "text2image-sd2[export]" in status["error"]
        assert took < 30, f"init took {took:.1f} s to fail (process start included)"
        assert _weights_sent(hub, "org/other") == [], "no weight file may be requested"
        assert not [p for p in (tmp_path / "storage").rglob("*") if "downloads" in p.parts and p.is_file()]
    finally:
        proc.stop()
        fake.stop()


def test_a_resume_and_init_arriving_together_share_one_load(hub: FakeHub, tiny_source: Path,
                                                            tmp_path: Path) -> None:
    """AppAPI 32 marks a new app enabled before it posts /init, so the start's resume and /init both ask for the
    models. While the admin settings are read (slowly here, as on a busy server) neither may start a second load:
    two would fetch into one download folder, and the one that fails first deletes it under the other."""
    _add_uncovered_repo(hub, tiny_source, tmp_path)
    fake = FakeNextcloud(version=32).start()
    fake.slow["/ex-app/config/get-values"] = 1.0
    proc = ExAppProcess(fake, tmp_path / "storage", {"T2I_MODEL": "org/other", **_hub_env(hub, tmp_path)})
    try:
        status = fake.install(proc, timeout=60)
        assert "unet.cross_attention_dim: 48 (template: 32)" in status["error"], status
        lookups = [r for r in hub.requests if re.match(r"GET /api/models/org/other(/revision/[^/]+)?(\?|$)", r)]
        assert len(lookups) == 1, (lookups, proc.output()[-3000:])
        assert proc.output().count("looking up org/other on the model hub") == 1, proc.output()[-3000:]
    finally:
        proc.stop()
        fake.stop()


def test_not_enough_disk_fails_with_both_numbers_and_leaves_nothing(hub: FakeHub, tmp_path: Path) -> None:
    result = _generate(hub, tmp_path, tmp_path / "out", T2I_TEST_FREE_BYTES="100000")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not enough free disk space in" in result.stderr
    assert "100,000 bytes (0.00 GB) are free" in result.stderr and "needs " in result.stderr, result.stderr
    assert _weights_sent(hub) == []
    assert _store_leftovers(tmp_path / "store") == [], _store_leftovers(tmp_path / "store")


def test_a_download_cut_off_halfway_resumes_and_verifies(hub: FakeHub, tmp_path: Path) -> None:
    hub.faults[(REPO, UNET)] = ["cut"]
    result = _generate(hub, tmp_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    size = len(hub.repos[REPO].files[UNET].data)
    assert [(p, start) for r, p, start in hub.ranges if p == UNET] == [(UNET, size // 2)], hub.ranges
    bundle = tmp_path / "store" / "org--tiny-diffusers-openvino"
    verify = _cli(hub, tmp_path, "verify", str(bundle))
    assert verify.returncode == 0, verify.stderr


def test_a_corrupted_file_is_refused_and_fetched_once_more(hub: FakeHub, tmp_path: Path) -> None:
    vae = "vae/diffusion_pytorch_model.fp16.safetensors"
    hub.faults[(REPO, vae)] = ["corrupt"]
    result = _generate(hub, tmp_path, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert hub.files_sent(REPO).count(vae) == 2

    hub.faults[(REPO, vae)] = ["corrupt", "corrupt"]
    again = _generate(hub, tmp_path / "second", tmp_path / "out2")
    assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
    assert f"{vae} from '{REPO}' does not match the hub's sha256" in again.stderr
    assert _store_leftovers(tmp_path / "second" / "store") == []
