"""The benchmark's harness on the tiny model: a configuration measured in its own process gives every figure, and
the GPU run compares our CUDA bundle (with and without CUDA graphs) with diffusers fp16 on the same device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.bench.report import GPU_REFERENCE, configurations, run_case, turbo_configurations


def test_a_configuration_is_measured_in_its_own_process(openvino_bundle: Path) -> None:
    case = {"kind": "ours", "bundle": openvino_bundle, "engine": "openvino", "threads": 1, "latents": [32],
            "batches": [1], "steps": 1, "guidance": 7.5, "warmup": 1, "repeats": 1}
    result = run_case(case, timeout=600)
    assert "error" not in result, result
    for key in ("text_encoder", "decode@32", "unet_step@32x1", "image@32x1"):
        assert result[key]["s"] > 0, key
    # CPU time comes in clock ticks (10 ms), too coarse for the tiny model's steps; the ratio is only present here.
    assert result["unet_step@32x1"]["cpu_per_wall"] >= 0
    assert 0 < result["rss_mb"] <= result["peak_rss_mb"]


def test_a_failing_configuration_is_reported_not_raised(tmp_path: Path) -> None:
    case = {"kind": "ours", "bundle": tmp_path / "missing", "engine": "openvino", "threads": 1, "latents": [32],
            "batches": [1], "steps": 1, "guidance": 0.0, "warmup": 0, "repeats": 1}
    assert "missing" in run_case(case, timeout=600)["error"]


def test_gpu_configurations() -> None:
    paths = {"source": Path("src"), "cuda": Path("cuda-bundle")}
    confs = dict(configurations(paths, peers=True, device="cuda:1"))
    ours = [c for label, c in confs.items() if label.startswith("ours")]
    assert ours and all(c["device"] == "cuda:1" and c["engine"] == "onnxruntime" for c in ours)
    assert {bool(c.get("cuda_graph")) for c in ours} == {True, False}
    assert confs[GPU_REFERENCE] == {"kind": "diffusers", "source": Path("src"), "device": "cuda:1", "dtype": "fp16"}
    turbo = dict(turbo_configurations(paths, peers=True, device="cuda"))
    assert {c.get("decoder", "vae") for label, c in turbo.items() if "ours" in label} == {"vae", "taesd"}


JSON_RULE = r'''
import os, sys
import backend.bench.report as report
from nncf.common.logging.track_progress import track

def noisy_measure(*args, **kwargs):
    # What the int8 export does on stdout: NNCF's rich progress table, a plain print, native code writing to fd 1.
    for _ in track(range(3), description="Statistics collection"):
        pass
    print("INFO:nncf:Compressing weights")
    os.write(1, b"native progress line\n")
    return {"machine": {}, "matmul_gflops": {}, "results": {"x": {"s": 1.0}}, "settings": {}}

report.measure = noisy_measure
report.run(None, 1, [64], [1], 1, 0.0, 1, False, True, None, as_json=True)
'''


def test_bench_json_is_the_json_alone() -> None:
    done = subprocess.run([sys.executable, "-c", JSON_RULE], capture_output=True, text=True, check=True,
                          env={**os.environ, "FORCE_COLOR": "1"})
    assert json.loads(done.stdout)["results"] == {"x": {"s": 1.0}}, done.stdout
    assert "native progress line" in done.stderr and "Compressing weights" in done.stderr


def test_memory_is_the_childs_own_and_matches_time_v(tmp_path: Path) -> None:
    # Issue #14: ru_maxrss is carried from the parent into a forked child, so every bench child reported the
    # parent's peak. A parent holding ~600 MB starts children that allocate ~100 and ~300 MB.
    if not Path("/usr/bin/time").exists():
        pytest.skip("/usr/bin/time is not installed (Debian: apt-get install time)")
    child = ("import numpy as np, sys; from backend.bench.memory import peak_rss_mb, rss_mb; "
             "a = np.ones(int(sys.argv[1]) * 2**20, dtype=np.uint8); now = rss_mb(); print(peak_rss_mb(), now)")
    parent = f"""
import json, subprocess, sys
import numpy as np
hold = np.ones(600 * 2**20, dtype=np.uint8)
found = []
for n in ("100", "300"):
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", {child!r}, n], capture_output=True, text=True)
    kb = done.stderr.split("Maximum resident set size (kbytes): ")[1].split()[0]
    found.append([*map(float, done.stdout.split()), int(kb) / 1024])
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    (small, small_now, small_time), (big, big_now, big_time) = json.loads(out)
    for peak, now, timed in ((small, small_now, small_time), (big, big_now, big_time)):
        assert abs(peak - timed) <= 0.05 * timed, (peak, timed)
        assert 0 < now <= peak
    assert 100 <= small < 400 and 300 <= big < 600, "each child reports its own memory, not the parent's 600 MB"
    assert 150 <= big - small <= 250


def test_fastsd_style_peer_runs_optimum_with_taesd_as_its_vae(tiny_source: Path, tmp_path: Path) -> None:
    # Issue #14: FastSD CPU runs optimum's OVStableDiffusionPipeline with TAESD in place of the VAE decoder.
    from backend.bench.cases import with_taesd_as_vae
    from exporters.export import export_model

    bundle = export_model(str(tiny_source), "openvino", tmp_path / "tiny-ov", say=lambda _: None, taesd="tiny")
    confs = dict(turbo_configurations({"openvino": bundle}, peers=True))
    case = confs["turbo fastsd-style optimum auto taesd"]
    assert case["decoder"] == "taesd" and case["kind"] == "optimum"
    common = {"threads": 1, "latents": [32], "batches": [1], "steps": 1, "guidance": 0.0, "warmup": 0, "repeats": 1}
    result = run_case({**case, **common}, timeout=600)
    assert "error" not in result, result
    assert result["image@32x1"]["s"] > 0 and result["decode@32"]["s"] > 0
    view = with_taesd_as_vae(bundle)
    assert (view / "vae_decoder").resolve() == (bundle / "taesd_decoder").resolve()
    assert (view / "unet").resolve() == (bundle / "unet").resolve() and not (view / "taesd_decoder").exists()


@pytest.mark.parametrize("decoder", ["vae", "taesd"])
def test_genai_peer_runs_on_the_bundles_own_weights(tiny_source: Path, tmp_path: Path, decoder: str) -> None:
    # Issue #22: OpenVINO GenAI's Text2ImagePipeline as a peer, reading our bundle through a view in its layout.
    import openvino as ov

    from backend.bench.cases import genai_view
    from exporters.export import export_model

    bundle = export_model(str(tiny_source), "openvino", tmp_path / "tiny-ov", say=lambda _: None, taesd="tiny")
    confs = dict(turbo_configurations({"openvino": bundle}, peers=True))
    case = confs[f"turbo genai openvino auto {decoder}"]
    common = {"threads": 1, "latents": [32], "batches": [1], "steps": 1, "guidance": 0.0, "warmup": 0, "repeats": 1}
    result = run_case({**case, **common}, timeout=600)
    assert "error" not in result, result
    assert result["image@32x1"]["s"] > 0
    view = genai_view(bundle, decoder)
    own = "taesd_decoder" if decoder == "taesd" else "vae_decoder"
    assert (view / "vae_decoder" / "openvino_model.bin").resolve() == (bundle / own / "openvino_model.bin").resolve()
    assert (view / "tokenizer" / "openvino_tokenizer.xml").is_file()
    # GenAI feeds the timestep as int64 [batch]; the bridge converts it for our graph, whose weights stay as they are.
    unet = ov.Core().read_model(view / "unet" / "openvino_model.xml")
    timestep = next(p for p in unet.inputs if "timestep" in p.get_names())
    assert timestep.get_element_type() == ov.Type.i64 and timestep.get_partial_shape().rank.get_length() == 1
    ours = ov.Core().read_model(bundle / "unet" / "openvino_model.xml")
    assert {c.get_friendly_name() for c in ours.get_ops() if c.get_type_name() == "Constant"} <= \
        {c.get_friendly_name() for c in unet.get_ops() if c.get_type_name() == "Constant"}


def test_a_peers_whole_image_ends_in_a_png_as_ours_does(tiny_source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Ours are timed from prompt to PNG; a peer timed without its PNG encode looked faster than it is.
    import diffusers
    from PIL import Image

    from backend.bench.cases import _png_of
    from backend.images import PNG_LEVEL

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_source, safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    saved: list[str] = []
    real_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", lambda self, fp, format=None, **kw: (
        saved.append(f"{format} {kw.get('compress_level')}"), real_save(self, fp, format=format, **kw))[1])
    _png_of(pipe, 64, 2, {"steps": 1, "guidance": 0.0})
    assert saved == [f"PNG {PNG_LEVEL}"] * 2, "at the zlib level ours are written at"


def test_ours_is_shown_against_the_fastest_peer_of_the_same_run() -> None:
    from backend.bench.report import turbo_lines

    results = {"ours openvino auto taesd": {"image@64x1": {"s": 0.9}},
               "optimum openvino auto": {"image@64x1": {"s": 2.7}},
               "fastsd-style optimum auto taesd": {"image@64x1": {"s": 1.8}},
               "ours openvino int8 taesd": {"error": "no int8 bundle"}}
    lines = turbo_lines(results)
    assert lines[0].endswith("0.90 s  (2.00x the fastest peer, fastsd-style optimum auto taesd)"), lines
    assert lines[1].endswith("2.70 s") and lines[3].endswith("failed: no int8 bundle"), lines
