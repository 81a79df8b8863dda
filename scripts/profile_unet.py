"""Where a UNet step's time goes on OpenVINO: per-op-class time of one CFG step, for one or more bundles side by
side (e.g. the default bf16 bundle and the int8 one), from OpenVINO's own per-node counters.

    python scripts/profile_unet.py ~/.cache/text2image-sd2/bench/sd21-openvino ~/.cache/text2image-sd2/bench/sd21-int8

Not run by CI. The classes: convolutions, fully connected (linear) layers, self-attention at the largest latent
(the fused MatMul-Softmax-MatMul of 4096 tokens at 512²), other attention, and everything else (norms, elementwise,
layout changes).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


def op_class(node_type: str, name: str) -> str:
    if node_type == "Convolution":
        return "convolution"
    if node_type.startswith("FullyConnected"):
        return "fully connected"
    if "/attn1/" in name and ("down_blocks.0/" in name or "up_blocks.3/" in name) and node_type == "Subgraph":
        return "self-attention, largest latent"
    if ("/attn1/" in name or "/attn2/" in name) and node_type == "Subgraph":
        return "other attention"
    return "other (norms, elementwise, layout)"


def profile(bundle: Path, latent: int, batch: int, threads: int, repeats: int) -> tuple[float, dict[str, float]]:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(bundle / "unet" / "openvino_model.xml"))
    scalar_t = model.input("timestep").get_partial_shape().rank.get_length() == 0
    model.reshape({"sample": [batch, 4, latent, latent], "timestep": [] if scalar_t else [batch],
                   "encoder_hidden_states": [batch, 77, model.input("encoder_hidden_states").get_partial_shape()[2]]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "PERF_COUNT": True})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feeds = {}
    for port in compiled.inputs:
        dtype = port.get_element_type().to_dtype()
        feeds[port.get_any_name()] = np.asarray(rng.uniform(0, 1, tuple(port.get_shape())) * 500, dtype=dtype)
    request.infer(feeds)
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer(feeds)
        walls.append(time.perf_counter() - t0)
    classes: dict[str, float] = defaultdict(float)
    for info in request.profiling_info:
        classes[op_class(info.node_type, info.node_name)] += info.real_time.total_seconds()
    return float(np.median(walls)), dict(classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="OpenVINO bundle folders")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512² images)")
    parser.add_argument("--batch", type=int, default=2, help="UNet batch (2 = one image with guidance)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {b: profile(b, args.latent, args.batch, args.threads, args.repeats) for b in args.bundles}
    names = sorted({c for _, classes in results.values() for c in classes})
    print(f"UNet step, latent {args.latent}², batch {args.batch}, {args.threads} threads; seconds (share)")
    print(f"{'':36s}" + "".join(f"{b.name:>24s}" for b in results))
    print(f"{'wall (median)':36s}" + "".join(f"{wall:>24.3f}" for wall, _ in results.values()))
    for name in names:
        cells = []
        for _, classes in results.values():
            total = sum(classes.values())
            cells.append(f"{classes.get(name, 0.0):>14.3f} ({classes.get(name, 0.0) / total:>4.0%})   ")
        print(f"{name:36s}" + "".join(f"{c:>24s}" for c in cells))


if __name__ == "__main__":
    main()
