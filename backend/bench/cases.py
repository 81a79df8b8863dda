"""One benchmark configuration, measured in a process of its own so that its peak memory is its own.

Run as ``python -m backend.bench.cases '<json>'``; prints one JSON object. Every figure is a median of ``repeats``
runs after ``warmup`` runs (the first run of an OpenVINO static shape includes its compile).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from backend.bench.memory import peak_rss_mb, rss_mb

PROMPT = "a photograph of a red fox in the snow, detailed fur, soft light"


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall seconds of ``fn`` and the process's CPU-time / wall-time ratio while it ran."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), os.times()
        fn()
        t1, c1 = time.perf_counter(), os.times()
        walls.append(t1 - t0)
        cpus.append((c1.user - c0.user) + (c1.system - c0.system))
    return {"s": statistics.median(walls), "cpu_per_wall": sum(cpus) / sum(walls)}


def _png_of(pipe: Any, side: int, n: int, case: dict[str, Any]) -> None:
    """A diffusers-style peer's whole image: its pipeline call, then each image encoded as PNG, as ours are in every
    ``image@`` timing (``backend.images.png_bytes`` saves with PIL's defaults too): the same work on every side."""
    images = pipe(PROMPT, height=side, width=side, num_inference_steps=case["steps"],
                  guidance_scale=case["guidance"], num_images_per_prompt=n).images
    for image in images:
        image.save(io.BytesIO(), format="PNG")


def _inputs(latent: int, batch: int, dim: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((batch, 4, latent, latent), dtype=np.float32),
        "timestep": np.array(500.0, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, dim), dtype=np.float32),
    }


def ours(case: dict[str, Any]) -> dict[str, Any]:
    """Our runtime: components through the same sessions ``Pipeline.generate`` uses."""
    from backend.images import png_bytes
    from runtime import Pipeline
    from runtime.options import LoadOptions
    from runtime.request import GenerationRequest

    # A case names the load options it sets (engine, threads, precision …); the device defaults to the CPU.
    options = {"device": "cpu", **{k: v for k, v in case.items() if k in {f.name for f in fields(LoadOptions)}}}
    pipe = Pipeline.load(case["bundle"], **options)
    dim = int(pipe.unet.inputs["encoder_hidden_states"].shape[-1] or 1024)
    w, r = case["warmup"], case["repeats"]
    out: dict[str, Any] = {"text_encoder": timed(lambda: pipe._encode(PROMPT), w, r)}
    for latent in case["latents"]:
        lat = np.random.default_rng(1).standard_normal((1, 4, latent, latent), dtype=np.float32)
        out[f"decode@{latent}"] = timed(partial(pipe._decode, lat), w, r)
        for n in case["batches"]:
            feeds = _inputs(latent, 2 * n if case["guidance"] > 1 else n, dim)
            out[f"unet_step@{latent}x{n}"] = timed(partial(pipe.unet.run, feeds), w, r)
            side = latent * pipe.bundle.vae_scale_factor

            def whole(n: int = n, side: int = side) -> None:
                request = GenerationRequest(prompt=PROMPT, n=n, width=side, height=side, steps=case["steps"],
                                            guidance=case["guidance"], seed=0, scheduler="euler")
                for item in pipe.run(request):
                    png_bytes(item)

            out[f"image@{latent}x{n}"] = timed(whole, w, r)
    out["rss_mb"] = rss_mb()  # with the model still loaded: what a service holding it keeps
    return out


def diffusers_torch(case: dict[str, Any]) -> dict[str, Any]:
    """The reference: diffusers' StableDiffusionPipeline in PyTorch, same weights; fp32 on the CPU, or on a GPU
    (``device`` cuda) in ``dtype`` fp16, as diffusers is run there."""
    import diffusers
    import torch

    torch.set_num_threads(case["threads"])
    device = case.get("device", "cpu")
    dtype = torch.float16 if case.get("dtype") == "fp16" else torch.float32
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(case["source"], safety_checker=None,
                                                             requires_safety_checker=False, torch_dtype=dtype)
    pipe = pipe.to(device)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    dim = pipe.unet.config.cross_attention_dim
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)

    def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
        """GPU work is asynchronous: a timing must wait for it to finish."""
        if not device.startswith("cuda"):
            return fn

        def run() -> Any:
            out = fn()
            torch.cuda.synchronize()
            return out

        return run

    w, r = case["warmup"], case["repeats"]
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["text_encoder"] = timed(synced(lambda: pipe.text_encoder(ids)), w, r)
        for latent in case["latents"]:
            lat = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
            out[f"decode@{latent}"] = timed(synced(partial(pipe.vae.decode, lat / 0.18215)), w, r)
            for n in case["batches"]:
                t = {k: torch.from_numpy(v).to(device, dtype) for k, v in
                     _inputs(latent, 2 * n if case["guidance"] > 1 else n, dim).items()}
                out[f"unet_step@{latent}x{n}"] = timed(synced(
                    partial(pipe.unet, t["sample"], t["timestep"], t["encoder_hidden_states"])), w, r)
                side = latent * 8
                out[f"image@{latent}x{n}"] = timed(partial(_png_of, pipe, side, n, case), w, r)
    out["rss_mb"] = rss_mb()  # with the model still loaded: what a service holding it keeps
    return out


def optimum_pipeline(case: dict[str, Any]) -> dict[str, Any]:
    """optimum's own pipelines on the same exported graphs: ORTStableDiffusionPipeline (ONNX) or
    OVStableDiffusionPipeline (OpenVINO, reshaped to static shapes per measurement, as optimum recommends).
    ``decoder`` taesd: the bundle's TAESD decoder as the pipeline's VAE decoder (FastSD CPU's configuration)."""
    import diffusers

    is_ov = case["engine"] == "openvino"
    folder = with_taesd_as_vae(Path(case["bundle"])) if case.get("decoder") == "taesd" else case["bundle"]
    if is_ov:
        from optimum.intel import OVStableDiffusionPipeline

        pipe = OVStableDiffusionPipeline.from_pretrained(folder, compile=False,
                                                         ov_config={"INFERENCE_NUM_THREADS": case["threads"],
                                                                    "PERFORMANCE_HINT": "LATENCY"})
    else:
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = case["threads"], 1
        pipe = ORTStableDiffusionPipeline.from_pretrained(folder, session_options=opts)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    w, r = case["warmup"], case["repeats"]
    ids = np.asarray(pipe.tokenizer([PROMPT], padding="max_length", max_length=77).input_ids, dtype=np.int64)
    unet_config = json.loads((Path(case["bundle"]) / "unet" / "config.json").read_text())
    dim = int(unet_config["cross_attention_dim"])
    out: dict[str, Any] = {}
    for latent in case["latents"]:
        for n in case["batches"]:
            side = latent * 8
            batch = 2 * n if case["guidance"] > 1 else n
            if is_ov:
                pipe.reshape(batch_size=1, height=side, width=side, num_images_per_prompt=n)
                if batch != 2 * n:
                    # optimum always fixes the UNet batch at 2n (CFG); without guidance diffusers feeds n.
                    model = pipe.unet.model
                    model.reshape({p.get_any_name(): [batch, *list(p.get_partial_shape())[1:]] if
                                   p.get_partial_shape().rank.get_length() > 0 else p.get_partial_shape()
                                   for p in model.inputs})
                pipe.compile()
            feeds = _inputs(latent, batch, dim)
            out[f"unet_step@{latent}x{n}"] = timed(partial(pipe.unet, **feeds), w, r)
            out[f"image@{latent}x{n}"] = timed(partial(_png_of, pipe, side, n, case), w, r)
            if n == case["batches"][0]:
                # The decoder's batch is fixed with the pipeline's; time it at that batch, per image.
                lat = np.random.default_rng(1).standard_normal((n, 4, latent, latent), dtype=np.float32)
                per = timed(partial(pipe.vae_decoder, latent_sample=lat), w, r)
                out[f"decode@{latent}"] = {**per, "s": per["s"] / n}
    out["text_encoder"] = timed(lambda: pipe.text_encoder(input_ids=ids), w, r)
    out["rss_mb"] = rss_mb()  # with the model still loaded: what a service holding it keeps
    return out


def with_taesd_as_vae(bundle: Path) -> Path:
    """A folder next to ``bundle`` that optimum loads as a pipeline whose VAE decoder is the bundle's TAESD decoder
    (as FastSD CPU swaps it in): links to the bundle's parts, with ``taesd_decoder`` as ``vae_decoder``. TAESD's
    config carries its own scaling factor (1.0), which optimum's pipeline reads from there."""
    view = bundle.with_name(bundle.name + "-taesd-as-vae")
    view.mkdir(exist_ok=True)
    for part in bundle.iterdir():
        name = {"taesd_decoder": "vae_decoder", "vae_decoder": None}.get(part.name, part.name)
        link = view / name if name else None
        if link is not None and not link.exists():
            link.symlink_to(part.resolve())
    return view


KINDS = {"ours": ours, "diffusers": diffusers_torch, "optimum": optimum_pipeline}


def main() -> None:
    case = json.loads(sys.argv[1])
    result = KINDS[case["kind"]](case)
    # The kernel syncs per-thread RSS counters lazily, so a figure read earlier may exceed VmHWM read now by a
    # few pages; the peak is at least every figure seen.
    result["peak_rss_mb"] = max(peak_rss_mb(), result.get("rss_mb", 0.0))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
