"""What each weight and precision lever costs in pixels on the full-size model: PSNR against diffusers (fp32), for
an ε-prediction (SD2.1-base) and a v-prediction (SD2.1 768) random model, with each lever's peak memory beside it.

    python scripts/fidelity.py [--cache DIR] [--variants epsilon v] [--int8] [--size 256] [--steps 3]

Needs the export extra (diffusers is the reference; the bundles are exported here and cached in ``--cache``, the
bench's folder by default: ~5 GB per random model and ~3 GB per bundle). Every side starts from the same latents,
with the same prompts, Euler, guidance 7.5. Each lever runs in a process of its own, so its peak memory (VmHWM, the
pipeline loaded and one image made) is its own. The tiny test model hides these costs (its small layers round
less), which is why this runs the full size; it takes about 20 minutes per variant on 2 cores, not part of CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["a photograph of a red fox in the snow", "an oil painting of a lighthouse at dusk"]
GUIDANCE = 7.5
#: The floor the store's default bundle must keep at the default precision, on both prediction types.
FLOOR_DB = 40.0


def levers(paths: dict[str, Path]) -> list[tuple[str, Path, dict[str, str]]]:
    """(label, bundle, load options) for every lever measured; the default path is marked."""
    out = [
        ("onnx fp32 weights, onnxruntime", paths["onnx"], {"engine": "onnxruntime"}),
        ("openvino fp32 weights, fp32 math", paths["openvino-fp32"], {"engine": "openvino", "precision": "fp32"}),
        ("openvino fp32 weights, bf16 math", paths["openvino-fp32"], {"engine": "openvino", "precision": "bf16"}),
        ("openvino store weights, fp32 math", paths["openvino-store"], {"engine": "openvino", "precision": "fp32"}),
        ("openvino store weights, auto math (default)", paths["openvino-store"], {"engine": "openvino"}),
    ]
    if "int8" in paths:
        out.append(("openvino int8 (nncf), auto math", paths["int8"], {"engine": "openvino"}))
    return out


def prepare(cache: Path, variant: str, int8: bool) -> dict[str, Path]:
    """The random model of ``variant`` and its bundles, built once into ``cache``."""
    from backend.bench.report import store_folder
    from backend.model_store import store_export
    from exporters.dev.fullsize import build_full_model
    from exporters.export import export_model

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    suffix = "" if variant == "epsilon" else "-v"
    src = cache / f"sd21-random{suffix}"
    if not (src / "model_index.json").is_file():
        say(f"building the full-size random {variant} model in {src} …")
        build_full_model(src, variant=variant)  # type: ignore[arg-type]
    paths = {
        "source": src,
        "onnx": export_model(str(src), "onnx", cache / f"sd21-onnx{suffix}", say=say, taesd="random"),
        "openvino-fp32": export_model(str(src), "openvino", cache / f"sd21-openvino-fp32{suffix}", say=say),
        "openvino-store": export_model(str(src), "openvino", cache / store_folder(f"sd21-openvino-store{suffix}"),
                                       say=say, taesd="random", **store_export("openvino")),
    }
    if int8:
        paths["int8"] = export_model(str(src), "openvino", cache / f"sd21-int8{suffix}", precision="int8",
                                     say=say, taesd="random")
    return paths


def reference(src: Path, latents: np.ndarray, size: int, steps: int) -> np.ndarray:
    """diffusers' fp32 images (uint8, NHWC) for the prompts, from ``latents``."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(src, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = []
    with torch.no_grad():
        for prompt, lat in zip(PROMPTS, latents, strict=True):
            out = pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=GUIDANCE,
                       latents=torch.from_numpy(lat[None]), output_type="np").images
            images.append((out[0] * 255).round().astype(np.uint8))
    return np.stack(images)


def child(args: argparse.Namespace) -> None:
    """One lever, in its own process: load, generate every prompt from the saved latents, save the images."""
    from backend.bench.memory import peak_rss_mb
    from runtime import Pipeline

    options = json.loads(args.options)
    pipe = Pipeline.load(args.bundle, device="cpu", **options)
    latents = np.load(args.latents)
    images = [pipe.generate(prompt, width=args.size, height=args.size, steps=args.steps, guidance=GUIDANCE,
                            scheduler="euler", latents=lat[None])[0] for prompt, lat in zip(PROMPTS, latents,
                                                                                           strict=True)]
    np.save(args.out, np.stack([np.asarray(i) for i in images]))
    print(json.dumps({"peak_mb": peak_rss_mb(), "math": pipe.math_precision}))


def measure(bundle: Path, options: dict[str, str], latents: Path, size: int, steps: int, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", "--bundle", str(bundle), "--options", json.dumps(options),
           "--latents", str(latents), "--size", str(size), "--steps", str(steps), "--out", str(out)]
    from backend.bench.report import run_json

    got = run_json(cmd)
    return got if "error" in got else {**got, "images": np.load(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "text2image-sd2" / "bench")
    ap.add_argument("--variants", nargs="+", default=["epsilon", "v"], choices=["epsilon", "v"])
    ap.add_argument("--int8", action="store_true", help="also the nncf int8 bundle (its export takes ~12 min)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="measure only the levers whose label contains one of these")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--options", help=argparse.SUPPRESS)
    ap.add_argument("--latents", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from backend.bench.metrics import psnr

    rows = []
    with tempfile.TemporaryDirectory(prefix="t2i-fidelity-") as tmp:
        for variant in args.variants:
            paths = prepare(args.cache, variant, args.int8)
            lat = np.random.default_rng(0).standard_normal((len(PROMPTS), 4, args.size // 8, args.size // 8),
                                                            dtype=np.float32)
            lat_file = Path(tmp) / f"latents-{variant}.npy"
            np.save(lat_file, lat)
            ref = reference(paths["source"], lat, args.size, args.steps)
            for label, bundle, options in levers(paths):
                if args.only and not any(o in label for o in args.only):
                    continue
                print(f"measuring {variant}: {label} …", file=sys.stderr, flush=True)
                got = measure(bundle, options, lat_file, args.size, args.steps, Path(tmp) / "out.npy")
                if "error" in got:
                    rows.append((variant, label, "failed: " + got["error"]))
                    continue
                per_image = [psnr(got["images"][i:i + 1], ref[i:i + 1]) for i in range(len(PROMPTS))]
                rows.append((variant, label, f"{min(per_image):6.1f} / {max(per_image):6.1f} dB  "
                                             f"math {got['math']:4s}  peak {got['peak_mb']:6.0f} MB"))
    print(f"\nPSNR against diffusers fp32 (worst / best of {len(PROMPTS)} images), {args.size}², {args.steps} Euler "
          f"steps, guidance {GUIDANCE}; floor for the default: {FLOOR_DB:.0f} dB")
    for variant, label, text in rows:
        print(f"  {variant:8s} {label:46s} {text}")


if __name__ == "__main__":
    main()
