"""What AppAPI deploys: appinfo/info.xml and the two images. Acceptance 7 of issue #3.

The images cannot be built here, so their build steps are replayed from the Dockerfiles themselves: the COPY lines
fill a fresh folder as Docker's context would, and the ``pip install`` line runs in a fresh virtualenv. The CPU
line is installed for real (and must not bring torch); onnxruntime-gpu is ~255 MB, so the CUDA line is resolved
with ``pip install --dry-run --report`` instead.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from backend.bench.metrics import psnr
from backend.config import Settings

REPO = Path(__file__).resolve().parents[1]
#: Settings that only the standalone service or the CLI use; everything else must be declared for AppAPI.
NOT_FOR_THE_EXAPP = {"model_store", "data_dir", "host", "port", "users", "rate_limit", "rate_window",
                     "task_max_age_days", "max_connections_per_address", "trusted_proxies", "allowed_hosts"}


def _info() -> ET.Element:
    return ET.parse(REPO / "appinfo" / "info.xml").getroot()


def test_info_xml_declares_the_app_and_every_setting() -> None:
    info = _info()
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)  # type: ignore
    assert info.findtext("id") == "text2image_sd2" and info.findtext("version") == version
    nc = info.find("dependencies/nextcloud")
    assert nc is not None and (nc.get("min-version"), nc.get("max-version")) == ("30", "35")
    docker = info.find("external-app/docker-install")
    assert docker is not None and docker.findtext("registry") == "ghcr.io" and docker.findtext("image")
    assert docker.findtext("image-tag") == version
    declared = {}
    for var in info.findall("external-app/environment-variables/variable"):
        parts = {k: var.findtext(k) for k in ("name", "display-name", "description", "default")}
        assert all(parts.values()), parts  # AppAPI drops variables with an empty value
        declared[parts["name"]] = parts["default"]
    wanted = {env for name, env in Settings.env_names().items()
              if env.startswith("T2I_") and name not in NOT_FOR_THE_EXAPP}
    assert set(declared) == wanted
    # The declared defaults are the settings' own defaults.
    assert Settings.from_env(env=declared) == Settings.from_env(env={})


def _dockerfile(name: str) -> tuple[list[tuple[str, str]], list[str], str]:
    """(COPY sources and destinations before the install, pip install arguments, the whole text)."""
    text = (REPO / name).read_text()
    lines = text.replace("\\\n", " ").splitlines()
    copies, pip = [], None
    for line in lines:
        if line.startswith("COPY ") and pip is None:
            words = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
            copies += [(src, words[-1]) for src in words[:-1]]
        m = re.match(r"RUN\s+(?:pip3?|python3? -m pip)\s+install\s+(.+)$", line)
        if m:
            assert pip is None, f"{name}: one pip install line expected"
            pip = shlex.split(m.group(1).split("&&")[0])
    assert pip is not None, f"{name} has no pip install line"
    return copies, pip, text


def _context(copies: list[tuple[str, str]], app: Path) -> None:
    """What Docker's COPY lines put into WORKDIR /app."""
    app.mkdir()
    for src, dest in copies:
        target = app / src if dest in ("./", ".") else app / dest
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(REPO / src, target)


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin"


def _pip(bin_: Path, args: list[str], cwd: Path) -> None:
    # The image sets PIP_NO_CACHE_DIR; here the cache may serve, the resolution is the same.
    done = subprocess.run([str(bin_ / "pip"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PIP_NO_CACHE_DIR": "0"})
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"


def test_cpu_image_install_has_no_torch_and_runs_the_exapp(tmp_path: Path, tiny_v_source: Path,
                                                           openvino_v_bundle: Path) -> None:
    copies, args, text = _dockerfile("Dockerfile.cpu")
    assert "python:3.11" in text and '["/start.sh", "text2image", "serve"]' in text and "HEALTHCHECK" in text
    _context(copies, tmp_path / "app")
    bin_ = _venv(tmp_path / "venv")
    _pip(bin_, ["install", "-q", *args], tmp_path / "app")
    listed = subprocess.run([str(bin_ / "pip"), "list", "--format=json"], capture_output=True, text=True,
                            check=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert {"onnxruntime", "openvino", "nc-py-api", "uvicorn"} <= names
    assert not names & {"torch", "diffusers", "transformers", "optimum", "onnxruntime-gpu"}, names
    check = ("import sys; import backend.nextcloud.app as a; a.create_app(); "
             "from backend.nextcloud import exapp, worker, models, provider, delivery, journal; "
             "import runtime.pipeline; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([str(bin_ / "python"), "-c", check], cwd=tmp_path, check=True,
                   env={"PATH": os.environ["PATH"], "APP_ID": "x", "HOME": str(tmp_path)})
    out = subprocess.run([str(bin_ / "text2image"), "serve", "--help"], capture_output=True, text=True, check=True)
    assert "--workers" in out.stdout
    # The image turns a diffusers checkpoint into bundles by itself (issue #10): OpenVINO for the CPU, and the
    # fp16 ONNX conversion the CUDA image runs; the OpenVINO one gives the torch export's pixels.
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    for fmt, precision in (("openvino", "fp32"), ("onnx", "fp16")):
        bundle = tmp_path / f"{fmt}-{precision}"
        done = subprocess.run([str(bin_ / "text2image"), "export", str(tiny_v_source), "--format", fmt,
                               "--precision", precision, "--out", str(bundle)], capture_output=True, text=True,
                              env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((bundle / "manifest.json").read_text())["converter"] == "template"
    # The image has no measures of its own (backend.bench is not in the wheel): its PNGs are compared here.
    compare = ("import sys; from runtime import Pipeline; "
               "args = dict(prompt='a fox', steps=2, seed=3, width=256, height=256); "
               "[Pipeline.load(p, device='cpu', threads=1, precision='fp32').generate(**args)[0].save('%d.png' % i) "
               "for i, p in enumerate(sys.argv[1:])]")
    done = subprocess.run([str(bin_ / "python"), "-c", compare, str(tmp_path / "openvino-fp32"),
                           str(openvino_v_bundle)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert psnr([Image.open(tmp_path / "0.png")], [Image.open(tmp_path / "1.png")]) >= 60


def test_cuda_image_install_resolves_to_onnxruntime_gpu_only(tmp_path: Path) -> None:
    copies, args, text = _dockerfile("Dockerfile.cuda")
    assert re.search(r"FROM nvidia/cuda:12\.[\d.]+-cudnn-runtime", text), "CUDA 12: hosts with 12.2+ drivers"
    assert '["/start.sh", "text2image", "serve"]' in text and "HEALTHCHECK" in text
    _context(copies, tmp_path / "app")
    bin_ = _venv(tmp_path / "venv")
    report = tmp_path / "report.json"
    _pip(bin_, ["install", "-q", "--dry-run", "--ignore-installed", "--report", str(report), *args], tmp_path / "app")
    installs = {i["metadata"]["name"].lower(): i["metadata"] for i in json.loads(report.read_text())["install"]}
    names = set(installs)
    assert {"onnxruntime-gpu", "nc-py-api", "uvicorn", "onnx", "safetensors"} <= names
    assert not names & {"torch", "onnxruntime", "openvino", "diffusers"}, names
    # Built for CUDA 12 (what the base image and hosts with 12.2+ drivers have), not for CUDA 13.
    needs = [r for r in installs["onnxruntime-gpu"].get("requires_dist", []) if "cuda-runtime" in r]
    assert needs and all("cu12" in r for r in needs), needs


class _Heartbeat(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"status": "ok"}).encode() if self.path == "/heartbeat" else b"{}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("listening", [True, False])
def test_healthcheck_and_start_scripts(listening: bool) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Heartbeat)
    port = server.server_address[1]
    if listening:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    else:
        server.server_close()
    env = {"PATH": os.environ["PATH"], "APP_HOST": "0.0.0.0", "APP_PORT": str(port)}
    rc = subprocess.run(["sh", str(REPO / "scripts" / "image" / "healthcheck.sh")], env=env, timeout=10).returncode
    assert rc == (0 if listening else 1)
    if listening:
        server.shutdown()
        server.server_close()
    # Without HaRP the entrypoint only runs its arguments.
    out = subprocess.run(["sh", str(REPO / "scripts" / "image" / "start.sh"), "echo", "started"],
                         env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, check=True)
    assert out.stdout == "started\n" and not Path("/frpc.toml").exists()


def test_harp_mode_listens_on_the_unix_socket_and_the_healthcheck_sees_frpc(tmp_path: Path) -> None:
    """With HP_SHARED_KEY (HaRP) the app listens on HP_EXAPP_SOCK; the healthcheck wants it and frpc alive."""
    from fake_nextcloud import ExAppProcess, FakeNextcloud

    fake = FakeNextcloud()  # not started: the app only needs to answer on its socket here
    sock = tmp_path / "exapp.sock"
    proc = ExAppProcess(fake, tmp_path / "storage", {"HP_SHARED_KEY": "k", "HP_EXAPP_SOCK": str(sock)}).start()
    frpc = tmp_path / "frpc"  # a process named frpc, as start.sh would run it
    shutil.copy(shutil.which("sleep") or "/bin/sleep", frpc)
    env = {"PATH": os.environ["PATH"], "HP_SHARED_KEY": "k", "HP_EXAPP_SOCK": str(sock)}
    health = ["sh", str(REPO / "scripts" / "image" / "healthcheck.sh")]
    runner = subprocess.Popen([str(frpc), "60"])
    try:
        for _ in range(100):
            if subprocess.run(health, env=env, timeout=10).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"healthcheck never passed:\n{proc.output()}")
        runner.kill()
        runner.wait()
        assert subprocess.run(health, env=env, timeout=10).returncode == 1
    finally:
        runner.kill()
        proc.stop()


def test_readme_main_command_installs_what_serve_needs() -> None:
    # "Both services use the environment the main command created": its install line must bring the ExApp's extra.
    readme = (REPO / "README.md").read_text()
    main = next(line for line in readme.splitlines() if line.startswith("python3 -m venv .venv &&"))
    extras = re.search(r"pip install -e '\.\[([a-z,]+)\]'", main)
    assert extras, main
    assert {"cpu", "nextcloud"} <= set(extras.group(1).split(",")), main
