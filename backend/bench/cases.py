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
from backend.images import PNG_LEVEL

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
    ``image@`` timing, at the same zlib level (``backend.images.PNG_LEVEL``): the same work on every side."""
    images = pipe(PROMPT, height=side, width=side, num_inference_steps=case["steps"],
                  guidance_scale=case["guidance"], num_images_per_prompt=n).images
    for image in images:
        image.save(io.BytesIO(), format="PNG", compress_level=PNG_LEVEL)


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


def genai_pipeline(case: dict[str, Any]) -> dict[str, Any]:
    """OpenVINO GenAI's ``Text2ImagePipeline`` (C++, torch-free) on the bundle's own weights (see :func:`genai_view`),
    reshaped to the measured shape and compiled for the CPU as its documentation shows; each image ends in a PNG
    encode as ours do. It runs whole images only: its graphs are not reachable one by one."""
    import openvino_genai as genai
    from PIL import Image

    view = genai_view(Path(case["bundle"]), case.get("decoder", "vae"))
    pipe = genai.Text2ImagePipeline(str(view))
    # The same sampler as every other side of the bench.
    pipe.set_scheduler(genai.Scheduler.from_config(str(view / "scheduler" / "scheduler_config.json"),
                                                   genai.Scheduler.Type.EULER_DISCRETE))
    w, r = case["warmup"], case["repeats"]
    out: dict[str, Any] = {}
    for latent in case["latents"]:
        for n in case["batches"]:
            side = latent * 8
            pipe.reshape(n, side, side, case["guidance"])
            pipe.compile("CPU", INFERENCE_NUM_THREADS=case["threads"], PERFORMANCE_HINT="LATENCY")

            def whole(n: int = n, side: int = side) -> None:
                images = pipe.generate(PROMPT, width=side, height=side, num_inference_steps=case["steps"],
                                       guidance_scale=case["guidance"], num_images_per_prompt=n, rng_seed=0)
                for image in np.asarray(images.data):
                    Image.fromarray(image).save(io.BytesIO(), format="PNG", compress_level=PNG_LEVEL)

            out[f"image@{latent}x{n}"] = timed(whole, w, r)
    out["rss_mb"] = rss_mb()  # with the model still loaded: what a service holding it keeps
    return out


def genai_view(bundle: Path, decoder: str) -> Path:
    """A folder next to ``bundle`` in the layout OpenVINO GenAI reads (optimum-intel's), on the bundle's own weights.

    GenAI differs from our bundle in three places, each bridged without touching a weight: it wants the tokenizer as
    an OpenVINO graph (``openvino_tokenizer.xml``, converted here by openvino-tokenizers from the bundle's tokenizer
    files); its UNet feeds the timestep as int64 of shape [batch] where our graph takes a float scalar (a Convert and
    a Squeeze in front of the same graph, saved beside it); and it loads only an ``AutoencoderKL``, so with ``taesd``
    the TAESD decoder graph is given an AutoencoderKL config with TAESD's own latent scale (1.0) and channel count,
    as FastSD CPU swaps TAESD in for optimum's pipeline."""
    import openvino as ov
    import openvino.opset13 as ops
    from openvino_tokenizers import convert_tokenizer
    from transformers import AutoTokenizer

    view = bundle.with_name(f"{bundle.name}-genai-{decoder}")
    if (view / "model_index.json").is_file():
        return view
    view.mkdir(exist_ok=True)
    index = json.loads((bundle / "model_index.json").read_text())
    # Only the parts GenAI loads, under its names (a null entry stops its JSON reader).
    kept = {k: v for k, v in index.items() if k.startswith("_") or k in ("text_encoder", "tokenizer", "unet",
                                                                          "scheduler")}
    kept["vae"] = ["diffusers", "AutoencoderKL"]
    for part in ("text_encoder", "scheduler"):
        if not (view / part).exists():
            (view / part).symlink_to((bundle / part).resolve())

    unet = view / "unet"
    unet.mkdir(exist_ok=True)
    (unet / "config.json").write_text((bundle / "unet" / "config.json").read_text())
    model = ov.Core().read_model(bundle / "unet" / "openvino_model.xml")
    old = next(p for p in model.get_parameters() if "timestep" in p.output(0).get_names())
    if old.get_element_type() != ov.Type.i64 or old.get_partial_shape().rank.get_length() != 1:
        new = ops.parameter([-1], ov.Type.i64, name="timestep")
        new.output(0).set_names({"timestep"})
        t = ops.convert(new, old.get_element_type())
        if old.get_partial_shape().rank.get_length() == 0:
            t = ops.squeeze(t, ops.constant(np.array([0], dtype=np.int64)))
        old.output(0).replace(t.output(0))
        model = ov.Model(model.get_results(), [new if p is old else p for p in model.get_parameters()], "unet")
    ov.save_model(model, unet / "openvino_model.xml", compress_to_fp16=False)  # the weights as they are

    source = bundle / ("taesd_decoder" if decoder == "taesd" else "vae_decoder")
    vae = view / "vae_decoder"
    vae.mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.name != "config.json" and not (vae / f.name).exists():
            (vae / f.name).symlink_to(f.resolve())
    config = json.loads((source / "config.json").read_text())
    if decoder == "taesd":
        config = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
                  "latent_channels": config["latent_channels"], "scaling_factor": config.get("scaling_factor", 1.0),
                  "block_out_channels": config["decoder_block_out_channels"]}
    (vae / "config.json").write_text(json.dumps(config))

    tokenizer = view / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for f in (bundle / "tokenizer").iterdir():
        if not (tokenizer / f.name).exists():
            (tokenizer / f.name).symlink_to(f.resolve())
    encode, decode = convert_tokenizer(AutoTokenizer.from_pretrained(bundle / "tokenizer"), with_detokenizer=True)
    ov.save_model(encode, tokenizer / "openvino_tokenizer.xml")
    ov.save_model(decode, tokenizer / "openvino_detokenizer.xml")
    (view / "model_index.json").write_text(json.dumps(kept))  # last: marks the view complete
    return view


KINDS = {"ours": ours, "diffusers": diffusers_torch, "optimum": optimum_pipeline, "genai": genai_pipeline}


def main() -> None:
    case = json.loads(sys.argv[1])
    result = KINDS[case["kind"]](case)
    # The kernel syncs per-thread RSS counters lazily, so a figure read earlier may exceed VmHWM read now by a
    # few pages; the peak is at least every figure seen.
    result["peak_rss_mb"] = max(peak_rss_mb(), result.get("rss_mb", 0.0))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
