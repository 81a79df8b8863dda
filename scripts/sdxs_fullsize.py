"""Full-size random SDXS-512: our runtime against diffusers, and the torch-free converter against the torch export.

    python scripts/sdxs_fullsize.py [--work DIR] [--converters torch,template] [--engines onnxruntime,openvino]

Builds the SDXS-512 architecture with random weights (exporters/dev/fullsize.py; UNet 328,177,284 parameters, TAESD
as its VAE) into --work, converts it to an ONNX bundle with each converter (timed, in this process), and makes one
512² image per bundle and engine (fp32 math, 1 step, guidance 0, Euler) from the same latents as diffusers'
StableDiffusionPipeline with the AutoencoderTiny VAE. Prints the PSNR of each against diffusers and between the two
converters' bundles, and exits non-zero when one is under 40 dB. Needs the export extra and about 12 GB of disk
under --work; about 10 minutes on 2 cores. Too slow for the test suite, which runs the tiny model of the same
layout (tests/test_sdxs.py).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a red fox in the snow"
SIZE = 512
BAR_DB = 40.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--converters", default="torch,template")
    ap.add_argument("--engines", default="onnxruntime,openvino")
    args = ap.parse_args()
    if args.work:
        run(args.work, args.converters.split(","), args.engines.split(","))
    else:
        with tempfile.TemporaryDirectory(prefix="t2i-sdxs-") as tmp:
            run(Path(tmp), args.converters.split(","), args.engines.split(","))


def run(work: Path, converters: list[str], engines: list[str]) -> None:
    import diffusers
    import torch

    from backend.bench.metrics import psnr
    from exporters.dev.fullsize import build_sdxs_model
    from exporters.export import export_model
    from runtime import Pipeline

    checkpoint = work / "checkpoint"
    if not (checkpoint / "model_index.json").is_file():
        t0 = time.perf_counter()
        build_sdxs_model(checkpoint)
        print(f"random SDXS-512 checkpoint built in {time.perf_counter() - t0:.0f} s")
    latents = np.random.default_rng(0).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    reference = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None,
                                                                  requires_safety_checker=False)
    assert type(reference.vae).__name__ == "AutoencoderTiny", type(reference.vae)
    reference.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    ref = reference(PROMPT, height=SIZE, width=SIZE, num_inference_steps=1, guidance_scale=0.0,
                    latents=torch.from_numpy(latents), output_type="np").images
    print(f"diffusers (torch fp32): one image in {time.perf_counter() - t0:.1f} s")
    ref_u8 = list((ref * 255).round().astype(np.uint8))
    del reference

    images: dict[tuple[str, str], list] = {}
    failed = []
    for converter in converters:
        bundle = work / f"{converter}-onnx"
        shutil.rmtree(bundle, ignore_errors=True)
        t0 = time.perf_counter()
        export_model(str(checkpoint), "onnx", bundle, converter=converter, say=lambda _: None)
        print(f"{converter} converter: ONNX fp32 bundle in {time.perf_counter() - t0:.0f} s")
        for engine in engines:
            pipe = Pipeline.load(bundle, device="cpu", engine=engine, precision="fp32")
            t0 = time.perf_counter()
            ours = pipe.generate(PROMPT, steps=1, guidance=0.0, scheduler="euler", width=SIZE, height=SIZE,
                                 latents=latents)
            took = time.perf_counter() - t0
            images[converter, engine] = ours
            score = psnr(ours, ref_u8)
            print(f"{converter:8s} {engine:12s} fp32: PSNR {score:6.1f} dB against diffusers ({took:.2f} s/image)")
            if score < BAR_DB:
                failed.append(f"{converter}/{engine}: {score:.1f} dB")
            del pipe
    for engine in engines:
        if ("torch", engine) in images and ("template", engine) in images:
            score = psnr(images["torch", engine], images["template", engine])
            print(f"template vs torch bundle, {engine}: PSNR {score:.1f} dB")
    if failed:
        sys.exit(f"under {BAR_DB:g} dB: {', '.join(failed)}")


if __name__ == "__main__":
    main()
