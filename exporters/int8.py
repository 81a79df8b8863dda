"""The int8 variant of an OpenVINO bundle: the UNet quantized to int8 (weights and activations, so CPUs with VNNI or
AMX-INT8 run it in int8), the text encoder and VAE decoder with int8 weights only.

The UNet's activation ranges are calibrated on its real inputs: our own runtime generates images for a set of
prompts from the fp32 bundle and records what the UNet is fed at every step. It changes pixels more than bf16 does,
so it is an opt-in export (``--precision int8``) whose measured effect is reported by the tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exporters.openvino_ir import replace_graph

CALIBRATION_PROMPTS = (
    "a photograph of a red fox in the snow",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city skyline at night, neon lights",
    "a mountain lake with pine trees, morning fog",
    "an astronaut riding a horse, digital art",
    "a cozy living room with a fireplace, interior design",
)


def collect_unet_inputs(bundle: Path, samples: int, steps: int) -> list[dict[str, np.ndarray]]:
    """Run the fp32 bundle on the calibration prompts and keep the UNet's inputs (up to ``samples`` of them)."""
    from runtime import Pipeline

    pipe = Pipeline.load(bundle, device="cpu", engine="openvino", precision="fp32")
    seen: list[dict[str, np.ndarray]] = []
    unet_run = pipe.unet.run

    def recording(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        seen.append({k: v.copy() for k, v in feeds.items()})
        return unet_run(feeds)

    pipe.unet.run = recording  # type: ignore[method-assign]
    prompts = list(CALIBRATION_PROMPTS)
    i = 0
    while len(seen) < samples:
        pipe.generate(prompts[i % len(prompts)], steps=steps, seed=i)
        i += 1
    return seen[:samples]


def quantize_bundle(bundle: Path, samples: int = 16, steps: int = 4,
                    say: Callable[[str], None] = print) -> dict[str, Any]:
    """Quantize an fp32 OpenVINO bundle in place; return what was done, for the manifest."""
    import nncf
    import openvino as ov

    say(f"int8: collecting {samples} UNet calibration inputs from {len(CALIBRATION_PROMPTS)} prompts …")
    data = collect_unet_inputs(bundle, samples, steps)
    core = ov.Core()
    unet_xml = bundle / "unet" / "openvino_model.xml"
    say("int8: quantizing the UNet (weights and activations) …")
    quantized = nncf.quantize(core.read_model(unet_xml), nncf.Dataset(data), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(data))
    replace_graph(unet_xml, quantized)
    for component in ("text_encoder", "vae_decoder"):
        xml = bundle / component / "openvino_model.xml"
        say(f"int8: compressing {component} weights …")
        replace_graph(xml, nncf.compress_weights(core.read_model(xml), mode=nncf.CompressWeightsMode.INT8_ASYM))
    return {"unet": "int8 weights and activations", "calibration_samples": len(data),
            "text_encoder": "int8 weights", "vae_decoder": "int8 weights"}
