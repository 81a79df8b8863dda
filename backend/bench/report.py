"""``text2image bench``: our engines against the peers, side by side in one run, on the full-size SD2.1-base
architecture with random weights (speed does not depend on the weights' values).

Each configuration runs in its own process (warm-ups, then medians; its own peak memory). Ratios are printed
against diffusers' PyTorch fp32 pipeline, the reference; absolute times depend on the machine and its load.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

#: Analytic FLOPs of one SD2.1-base UNet evaluation per sample at a 64×64 latent (shared/research/performance.md);
#: attention grows faster than the area, but at 32×32 the area scaling is within a few percent.
UNET_FLOP_64 = 0.804e12
REFERENCE = "diffusers torch fp32"
GPU_REFERENCE = "diffusers torch fp16 cuda"


def store_folder(name: str) -> str:
    """The cache folder of a store-like export: the store's options differ per CPU (backend.model_store.store_export),
    and one folder holds one export."""
    from backend.model_store import store_export

    chosen = store_export("openvino")["int8_matmuls"]
    # Short names: OpenVINO GenAI finds a graph's neighbours by replacing "text_encoder" in its path.
    short = {"text_encoder": "te", "unet": "unet"}
    return name if chosen is True else f"{name}-int8{''.join(short[c] for c in chosen)}"


def prepare(cache: Path, int8: bool, say: Any, device: str = "cpu") -> dict[str, Path]:
    """Build the random full-size model once and export it (ONNX, OpenVINO, optionally int8; on a GPU the fp16
    ONNX bundle with onnxruntime's CUDA fusions); cached in ``cache``."""
    from backend.model_store import store_export
    from exporters.dev.fullsize import build_full_model
    from exporters.export import export_model

    src = cache / "sd21-random"
    if not (src / "model_index.json").is_file():
        say(f"building the full-size random SD2.1-base model in {src} (about 5 GB) …")
        build_full_model(src)
    paths = {"source": src}
    if device.startswith("cuda"):
        paths["cuda"] = export_model(str(src), "onnx", cache / "sd21-onnx-cuda-fp16", precision="fp16", say=say,
                                     taesd="random", fusions="cuda")
        return paths
    paths["onnx"] = export_model(str(src), "onnx", cache / "sd21-onnx", say=say, taesd="random")
    # OpenVINO: the weights the model store exports (fp16, int8 MatMul weights in the text encoder and the UNet),
    # which ours and optimum's pipelines both read.
    paths["openvino"] = export_model(str(src), "openvino", cache / store_folder("sd21-openvino-store"), say=say,
                                     taesd="random", **store_export("openvino"))
    if int8:
        paths["int8"] = export_model(str(src), "openvino", cache / "sd21-int8", precision="int8", say=say,
                                     taesd="random")
    # SDXS-512: the distilled one-step model, with TAESD as its own decoder; the store's export as for SD2.1.
    from exporters.dev.fullsize import build_sdxs_model

    sdxs = cache / "sdxs-random"
    if not (sdxs / "model_index.json").is_file():
        say(f"building the full-size random SDXS-512 model in {sdxs} (about 2.8 GB) …")
        build_sdxs_model(sdxs)
    paths["sdxs-source"] = sdxs
    paths["sdxs"] = export_model(str(sdxs), "openvino", cache / store_folder("sdxs-openvino-store"), say=say,
                                 **store_export("openvino"))
    if int8:
        paths["sdxs-int8"] = export_model(str(sdxs), "openvino", cache / "sdxs-int8", precision="int8", say=say)
    return paths


def configurations(paths: dict[str, Path], peers: bool, device: str = "cpu") -> list[tuple[str, dict[str, Any]]]:
    """(label, case) pairs: ours per engine and precision, then the peers on the same weights."""
    if device.startswith("cuda"):
        ours = {"kind": "ours", "bundle": paths["cuda"], "engine": "onnxruntime", "device": device}
        confs = [("ours onnxruntime cuda fp16", ours),
                 ("ours onnxruntime cuda fp16 graphs", {**ours, "cuda_graph": True})]
        if peers:
            confs.append((GPU_REFERENCE, {"kind": "diffusers", "source": paths["source"], "device": device,
                                          "dtype": "fp16"}))
        return confs
    confs = [
        ("ours onnxruntime fp32", {"kind": "ours", "bundle": paths["onnx"], "engine": "onnxruntime"}),
        ("ours openvino fp32", {"kind": "ours", "bundle": paths["openvino"], "engine": "openvino",
                                "precision": "fp32"}),
        ("ours openvino auto", {"kind": "ours", "bundle": paths["openvino"], "engine": "openvino"}),
        # The default decides per CPU (per-shape compile where it has AMX); both ways side by side.
        ("ours openvino auto static", {"kind": "ours", "bundle": paths["openvino"], "engine": "openvino",
                                       "static_shapes": "true"}),
        ("ours openvino auto shape-free", {"kind": "ours", "bundle": paths["openvino"], "engine": "openvino",
                                           "static_shapes": "false"}),
    ]
    if "int8" in paths:
        confs.append(("ours openvino int8", {"kind": "ours", "bundle": paths["int8"], "engine": "openvino"}))
    if peers:
        confs += [
            (REFERENCE, {"kind": "diffusers", "source": paths["source"]}),
            ("optimum onnxruntime fp32", {"kind": "optimum", "bundle": paths["onnx"], "engine": "onnxruntime"}),
            ("optimum openvino auto", {"kind": "optimum", "bundle": paths["openvino"], "engine": "openvino"}),
            ("genai openvino auto", {"kind": "genai", "bundle": paths["openvino"]}),
        ]
    return confs


def run_case(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Measure one configuration in a fresh process; failures are reported, not raised."""
    return run_json([sys.executable, "-m", "backend.bench.cases", json.dumps(case, default=str)], timeout)


def run_json(cmd: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run a measuring child process and return the JSON object its last line of output is; a failure or a time-out
    comes back as ``{"error": …}`` (the last line of its standard error), so one failed measurement ends no run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_peak(threads: int) -> dict[str, float]:
    """The machine's dense matrix-multiply throughput through OpenVINO, in GFLOP/s, for f32 and bf16 math.

    A chain of 8 matmuls (8192×2048 by 2048×2048) in one graph: the activations stay in the engine's own precision
    and layout between them, as inside the UNet; a single matmul would also time the f32→bf16 conversion of its
    input and output and read low.
    """
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops

    m, k, chain = 8192, 2048, 8
    a = ops.parameter([m, k], ov.Type.f32)
    x = a
    for i in range(chain):
        weights = np.random.default_rng(i).standard_normal((k, k), dtype=np.float32) / np.float32(np.sqrt(k))
        x = ops.matmul(x, ops.constant(weights), False, False)
    model = ov.Model([x], [a])
    inp = np.random.default_rng(100).standard_normal((m, k), dtype=np.float32)
    out = {}
    for hint in ("f32", "bf16"):
        req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                     "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
        for _ in range(2):
            req.infer([inp])
        reps = 5
        t0 = time.perf_counter()
        for _ in range(reps):
            req.infer([inp])
        out[hint] = 2 * m * k * k * chain * reps / (time.perf_counter() - t0) / 1e9
    return out


def turbo_configurations(paths: dict[str, Path], peers: bool, device: str = "cpu") -> list[tuple[str, dict]]:
    """The sd-turbo shape (512², 1 step, guidance 0) from prompt to PNG, with the VAE and with TAESD."""
    if device.startswith("cuda"):
        ours = {"kind": "ours", "bundle": paths["cuda"], "engine": "onnxruntime", "device": device,
                "cuda_graph": True}
        confs = [("turbo ours onnxruntime cuda fp16 graphs vae", ours),
                 ("turbo ours onnxruntime cuda fp16 graphs taesd", {**ours, "decoder": "taesd"})]
        if peers:
            confs.append(("turbo " + GPU_REFERENCE, {"kind": "diffusers", "source": paths["source"],
                                                     "device": device, "dtype": "fp16"}))
        return confs
    ours = {"kind": "ours", "bundle": paths["openvino"], "engine": "openvino"}
    confs = [("turbo ours openvino auto vae", ours), ("turbo ours openvino auto taesd", {**ours, "decoder": "taesd"}),
             ("turbo ours openvino auto taesd static", {**ours, "decoder": "taesd", "static_shapes": "true"}),
             ("turbo ours openvino auto taesd shape-free", {**ours, "decoder": "taesd", "static_shapes": "false"})]
    if "int8" in paths:
        confs.append(("turbo ours openvino int8 taesd", {**ours, "bundle": paths["int8"], "decoder": "taesd"}))
    if peers:
        confs.append(("turbo optimum openvino auto", {"kind": "optimum", "bundle": paths["openvino"],
                                                      "engine": "openvino"}))
        # OpenVINO GenAI's C++ pipeline on the same weights, with the VAE and with TAESD in its place.
        confs += [("turbo genai openvino auto vae", {"kind": "genai", "bundle": paths["openvino"]}),
                  ("turbo genai openvino auto taesd", {"kind": "genai", "bundle": paths["openvino"],
                                                       "decoder": "taesd"})]
        # FastSD CPU's configuration: optimum's OVStableDiffusionPipeline with TAESD as its VAE decoder, on the
        # fp weights and on the int8 ones.
        for name in ("openvino", "int8"):
            if name in paths:
                label = "auto" if name == "openvino" else "int8"
                confs.append((f"turbo fastsd-style optimum {label} taesd",
                              {"kind": "optimum", "bundle": paths[name], "engine": "openvino", "decoder": "taesd"}))
    return confs


def sdxs_configurations(paths: dict[str, Path], peers: bool) -> list[tuple[str, dict]]:
    """SDXS-512 (512², 1 step, guidance 0, its own TAESD decoder) from prompt to PNG: ours, optimum's OpenVINO
    pipeline on the same bundle (FastSD CPU's way to run it) and diffusers. OpenVINO GenAI loads no AutoencoderTiny."""
    if "sdxs" not in paths:
        return []
    confs = [("sdxs ours openvino auto", {"kind": "ours", "bundle": paths["sdxs"], "engine": "openvino"})]
    if "sdxs-int8" in paths:
        confs.append(("sdxs ours openvino int8", {"kind": "ours", "bundle": paths["sdxs-int8"], "engine": "openvino"}))
    if peers:
        confs += [("sdxs optimum openvino auto", {"kind": "optimum", "bundle": paths["sdxs"], "engine": "openvino"}),
                  ("sdxs " + REFERENCE, {"kind": "diffusers", "source": paths["sdxs-source"]})]
    return confs


def print_report(results: dict[str, dict[str, Any]], peak: dict[str, float], opts: dict[str, Any]) -> None:
    from backend.images import PNG_LEVEL

    reference = GPU_REFERENCE if GPU_REFERENCE in results else REFERENCE
    ref = results.get(reference, {})
    keys = sorted({k for r in results.values() for k in r if "@" in k or k == "text_encoder"})
    click.echo(f"\nSD2.1-base architecture, random weights; {opts['threads']} threads; guidance {opts['guidance']} "
               f"(CFG batch 2n); whole image = {opts['steps']} Euler steps + decode + PNG")
    click.echo(f"PNG on every side at zlib level {PNG_LEVEL} (PIL's default, 6, takes 3-4x longer), ours with metadata")
    click.echo(f"matrix multiply (OpenVINO, 8 chained 8192×2048×2048): f32 {peak['f32']:.0f} GFLOP/s, "
               f"bf16 {peak['bf16']:.0f} GFLOP/s")
    header = f"{'configuration':28s}" + "".join(f"{k:>16s}" for k in keys) + f"{'RSS MB':>9s}{'peak MB':>9s}"
    click.echo(header)
    for label, r in results.items():
        if "error" in r:
            click.echo(f"{label:28s}  failed: {r['error']}")
            continue
        cells = []
        for k in keys:
            if k not in r:
                cells.append(f"{'-':>16s}")
                continue
            s = r[k]["s"]
            ratio = f" ({ref[k]['s'] / s:.1f}x)" if k in ref and "error" not in ref else ""
            cells.append(f"{s:>8.3f}s{ratio:>8s}")
        click.echo(f"{label:28s}" + "".join(cells) + f"{r.get('rss_mb', 0):>9.0f}{r['peak_rss_mb']:>9.0f}")
    click.echo("(x) = speed-up over " + reference)
    for label, r in results.items():
        step = r.get("unet_step@64x1", {}).get("s") if "error" not in r else None
        if step:
            flops = UNET_FLOP_64 * (2 if opts["guidance"] > 1 else 1) / step
            click.echo(f"{label}: UNet step at 512² = {flops / 1e9:.0f} GFLOP/s "
                       f"({flops / 1e9 / peak['bf16']:.0%} of bf16 matmul peak, "
                       f"{flops / 1e9 / peak['f32']:.0%} of f32); CPU/wall {r['unet_step@64x1']['cpu_per_wall']:.2f}")


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to standard output meanwhile to standard error, at the file descriptor too.

    ``--json`` output must be the JSON alone, but the libraries the bench drives write progress to stdout: NNCF's
    progress tables during the int8 export, OpenVINO's and onnxruntime's native code straight to fd 1.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(cache: Path, threads: int, latents: list[int], batches: list[int], steps: int, guidance: float,
        repeats: int, peers: bool, int8: bool, only: list[str] | None, as_json: bool,
        device: str = "cpu") -> dict[str, Any]:
    """Prepare, measure every configuration, and print (or return as JSON) the comparison."""
    with stdout_to_stderr() if as_json else contextlib.nullcontext():
        report = measure(cache, threads, latents, batches, steps, guidance, repeats, peers, int8, only, device)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return report
    results = report["results"]
    print_report({k: v for k, v in results.items() if not k.startswith(("turbo", "sdxs"))}, report["matmul_gflops"],
                 report["settings"])
    click.echo("\nsd-turbo shape: 512², 1 step, guidance 0, whole image from prompt to PNG")
    for line in turbo_lines({k[6:]: v for k, v in results.items() if k.startswith("turbo")}):
        click.echo(line)
    sdxs = {k[5:]: v for k, v in results.items() if k.startswith("sdxs")}
    if sdxs:
        click.echo("\nSDXS-512: 512², 1 step, guidance 0, its own TAESD decoder, whole image from prompt to PNG")
        for line in turbo_lines(sdxs):
            click.echo(line)
    return report


def turbo_lines(results: dict[str, dict[str, Any]]) -> list[str]:
    """One line per configuration of the sd-turbo shape; ours also as a speed-up over the fastest peer measured
    in the same run (a peer is any configuration that is not ours)."""
    times = {label: r["image@64x1"]["s"] for label, r in results.items() if "error" not in r}
    peers = {label: t for label, t in times.items() if not label.startswith("ours")}
    fastest = min(peers, key=peers.__getitem__) if peers else None
    lines = []
    for label, r in results.items():
        if label not in times:
            lines.append(f"  {label:32s} failed: {r['error']}")
            continue
        vs = (f"  ({peers[fastest] / times[label]:.2f}x the fastest peer, {fastest})"
              if fastest and label.startswith("ours") else "")
        lines.append(f"  {label:32s} {times[label]:.2f} s{vs}")
    return lines


def measure(cache: Path, threads: int, latents: list[int], batches: list[int], steps: int, guidance: float,
            repeats: int, peers: bool, int8: bool, only: list[str] | None, device: str = "cpu") -> dict[str, Any]:
    """Prepare the bundles and measure every configuration; progress goes to standard error."""
    def say(message: str) -> None:
        click.echo(message, err=True)

    paths = prepare(cache, int8, say, device)
    common = {"threads": threads, "latents": latents, "batches": batches, "steps": steps, "guidance": guidance,
              "warmup": 1, "repeats": repeats}
    # The one-step shapes (sd-turbo, SDXS-512) run one 512² image without guidance whatever the options say.
    turbo = {**common, "batches": [1], "latents": [64], "steps": 1, "guidance": 0.0}
    planned = [(label, {**case, **common}) for label, case in configurations(paths, peers, device)]
    planned += [(label, {**case, **turbo}) for label, case in
                [*turbo_configurations(paths, peers, device), *sdxs_configurations(paths, peers)]]
    results: dict[str, dict[str, Any]] = {}
    for label, case in planned:
        if only and not any(o in label for o in only):
            continue
        say(f"measuring {label} …")
        results[label] = run_case(case, timeout=3600)
    peak = matmul_peak(threads)
    return {"machine": {"cpus": os.cpu_count(), "threads": threads, "device": device}, "matmul_gflops": peak,
            "results": results, "settings": common}
