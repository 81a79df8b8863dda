"""The torch-free converter against the torch export on the full-size architectures, side by side in one run.

    python scripts/convert_fullsize.py [--work DIR] [--format openvino|onnx] [--variants epsilon,v]
                                       [--converters torch,template] [--optimum-intel fp32,fp16,int8]

For the full-size random SD2.1-base (epsilon) and SD2.1 768 (v-prediction, upcast_attention) checkpoints, each
converter runs in a process of its own, timed, with its own peak memory (VmHWM, which exec resets); then one image
from each bundle (same latents, fp32 math) is compared (PSNR; identical graphs give inf). ``--optimum-intel`` also
exports the checkpoint with optimum-intel's ``optimum-cli export openvino`` in those weight formats (what FastSD CPU
ships) and compares our runtime's image from that folder with our own bundle's. Needs the export extra (and the
bench extra for optimum-intel) and about 30 GB of disk under --work; about 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from exporters.export import export_model
t0 = time.perf_counter()
export_model({source!r}, {fmt!r}, __import__('pathlib').Path({out!r}), converter={converter!r}, say=lambda _: None)
took = time.perf_counter() - t0
hwm = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM'))
print(json.dumps({{"seconds": took, "peak_rss_gb": hwm / 1e6}}))
"""

IMAGES = """
import sys
sys.path.insert(0, {root!r})
import numpy as np
from runtime import Pipeline
from backend.bench.metrics import psnr
images = []
for path in {bundles!r}:
    pipe = Pipeline.load(path, device='cpu', precision='fp32')
    images.append(pipe.generate('a lighthouse at dusk', steps=2, seed=3, width=512, height=512, guidance=7.5))
print(psnr(images[0], images[1]))
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(done.stderr[-4000:])
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "text2image-sd2" / "convert")
    ap.add_argument("--format", default="openvino", choices=["openvino", "onnx"])
    ap.add_argument("--variants", default="epsilon,v")
    ap.add_argument("--converters", default="torch,template")
    ap.add_argument("--optimum-intel", default="", help="weight formats for optimum-cli export openvino")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants.split(","):
        source = args.work / f"sd21-{variant}-random"
        if not (source / "model_index.json").is_file():
            print(f"building the full-size random {variant} checkpoint …", file=sys.stderr)
            run(f"import sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
                f"from exporters.dev.fullsize import build_full_model; "
                f"build_full_model(Path({str(source)!r}), variant={variant!r}); print('ok')")
        bundles = []
        for converter in args.converters.split(","):
            out = args.work / f"{variant}-{converter}-{args.format}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"{variant}: {converter} converter …", file=sys.stderr)
            stats = json.loads(run(CHILD.format(root=str(ROOT), source=str(source), fmt=args.format, out=str(out),
                                                converter=converter)))
            stats["bundle_gb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e9
            rows.append((variant, converter, stats))
            bundles.append(str(out))
        if len(bundles) == 2:
            score = float(run(IMAGES.format(root=str(ROOT), bundles=bundles)))
            rows.append((variant, "PSNR template vs torch", {"psnr": score}))
        for weight_format in filter(None, args.optimum_intel.split(",")):
            folder = args.work / f"{variant}-optimum-intel-{weight_format}"
            shutil.rmtree(folder, ignore_errors=True)
            print(f"{variant}: optimum-cli export openvino --weight-format {weight_format} …", file=sys.stderr)
            cli = Path(sys.executable).with_name("optimum-cli")
            t0 = time.perf_counter()
            done = subprocess.run([str(cli), "export", "openvino", "--model", str(source), "--task", "text-to-image",
                                   "--weight-format", weight_format, str(folder)], capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(done.stderr[-4000:])
            took = time.perf_counter() - t0
            score = float(run(IMAGES.format(root=str(ROOT), bundles=[str(folder), bundles[-1]])))
            rows.append((variant, f"PSNR optimum-intel {weight_format} (exported in {took:.0f} s) vs ours",
                         {"psnr": score}))
            shutil.rmtree(folder, ignore_errors=True)
        for b in bundles:
            shutil.rmtree(b, ignore_errors=True)
    print(f"\nfull-size random checkpoints → {args.format} bundle, {time.strftime('%Y-%m-%d')}")
    for variant, what, stats in rows:
        if "psnr" in stats:
            print(f"  {variant:8s} {what}: {stats['psnr']:.1f} dB")
        else:
            print(f"  {variant:8s} {what:9s} {stats['seconds']:7.1f} s   peak RSS {stats['peak_rss_gb']:5.1f} GB   "
                  f"bundle {stats['bundle_gb']:.2f} GB")


if __name__ == "__main__":
    main()
