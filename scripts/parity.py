"""Print how close our runtime comes to diffusers on the tiny model, per engine and scheduler (PSNR in dB).

    python scripts/parity.py [--steps 10]

Needs the export extra (diffusers is the reference). The tests assert ≥ 40 dB; this prints the figures.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import diffusers
    import torch

    from backend.bench.metrics import psnr
    from exporters.export import export_model
    from exporters.tiny import build_tiny_model
    from runtime import Pipeline

    names = {"euler": "EulerDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler", "ddim": "DDIMScheduler"}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("epsilon", "v"):
            src = build_tiny_model(Path(tmp) / f"tiny-{variant}", variant=variant)  # type: ignore[arg-type]
            ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None,
                                                                         requires_safety_checker=False)
            ref_pipe.set_progress_bar_config(disable=True)
            for fmt, engine in (("onnx", "onnxruntime"), ("openvino", "openvino")):
                bundle = export_model(str(src), fmt, Path(tmp) / f"{variant}-{fmt}", say=lambda _: None)
                pipe = Pipeline.load(bundle, device="cpu", engine=engine)
                lat = np.random.default_rng(0).standard_normal((1, 4, 32, 32), dtype=np.float32)
                for sched, cls in names.items():
                    ref_pipe.scheduler = getattr(diffusers, cls).from_config(ref_pipe.scheduler.config)
                    for guidance in (0.0, 7.5):
                        ref = ref_pipe("a red fox", height=256, width=256, num_inference_steps=args.steps,
                                       guidance_scale=guidance, latents=torch.from_numpy(lat), output_type="np").images
                        ours = pipe.generate("a red fox", steps=args.steps, guidance=guidance, scheduler=sched,
                                             latents=lat, width=256, height=256)
                        score = psnr(ours, (ref * 255).round().astype(np.uint8))
                        print(f"{variant:8s} {engine:12s} {sched:8s} guidance {guidance:4.1f}: PSNR {score:6.1f} dB")


if __name__ == "__main__":
    main()
