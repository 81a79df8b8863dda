"""Prompt → images from an exported bundle: tokenizer, text encoder, the denoising loop, the VAE decoder."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime import validation as v
from runtime.bundle import Bundle
from runtime.engines import (
    DeviceChoice,
    EngineChoice,
    PrecisionChoice,
    Session,
    check_precision,
    choose,
    compile_cache_dir,
    default_threads,
    open_session,
    openvino_math_precision,
    parse_threads,
)
from runtime.errors import BundleError, ConfigError, GenerationCancelled, InvalidRequest
from runtime.options import DecoderChoice
from runtime.request import Defaults, GenerationRequest
from runtime.schedulers import Scheduler, default_scheduler_name, make_scheduler
from runtime.tokenizer import ClipTokenizer

log = logging.getLogger(__name__)

#: Called after each denoising step with (steps done, steps in all); returning False stops the run.
StepCallback = Callable[[int, int], "bool | None"]

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 7.5
#: Latents → pixels: the model's own VAE decoder, or the TAESD decoder when the bundle has one (faster, coarser).
DECODERS: dict[str, str] = {"vae": "vae_decoder", "taesd": "taesd_decoder"}


@dataclass(frozen=True)
class Generated:
    """One finished image with what reproduces it: the resolved request (every default filled in; ``n`` is the
    whole batch's), this image's own seed, and the model's source id."""

    image: Image.Image
    seed: int
    request: GenerationRequest
    model: str


class Pipeline:
    """A loaded bundle that turns prompts into images. Create it with :meth:`Pipeline.load`."""

    def __init__(self, bundle: Bundle, engine: str, device: str, threads: int, why: str,
                 decoder: str = "vae", precision: str = "auto", cuda_graph: bool = False,
                 compile_cache: Path | None = None, static_shapes: bool = False) -> None:
        if cuda_graph and not device.startswith("cuda"):
            raise ConfigError(f"CUDA graphs need --device cuda; this pipeline runs on {device}")
        self.cuda_graph = cuda_graph
        self.compile_cache = compile_cache
        self.static_shapes = static_shapes
        self.bundle = bundle
        self.engine = engine
        self.device = device
        self.threads = threads
        self.precision = check_precision(precision, engine)
        #: What the engine really computes in: OpenVINO picks by the CPU (see openvino_math_precision); onnxruntime
        #: runs the graph's own types.
        self.math_precision = openvino_math_precision(self.precision) if engine == "openvino" else bundle.precision
        if self.precision == "bf16" and self.math_precision != "bf16":
            log.warning("precision bf16 was asked for, but this CPU has no native bf16 (AMX or AVX512-BF16): "
                        "OpenVINO computes in %s", self.math_precision)
        if decoder not in DECODERS:
            raise ConfigError(f"decoder '{decoder}' is not known; use one of {', '.join(DECODERS)}")
        if not bundle.has(DECODERS[decoder]):
            raise BundleError(f"bundle '{bundle.path}' has no {decoder} decoder ({DECODERS[decoder]}/); "
                           "export it with `text2image export SOURCE --taesd madebyollin/taesd` or use --decoder vae")
        self.decoder = decoder
        self.tokenizer = ClipTokenizer.load(bundle.path / "tokenizer")
        t0 = time.perf_counter()
        self.text_encoder = self._open("text_encoder")
        self.unet = self._open("unet")
        self.vae_decoder = self._open(DECODERS[decoder])
        # The factor the latents were scaled by for the UNet; TAESD was trained on the scaled latents (factor 1).
        self._latent_scale = (bundle.vae_scaling_factor if decoder == "vae"
                              else float(bundle.component_config(DECODERS[decoder]).get("scaling_factor", 1.0)))
        log.info(
            "loaded %s (%s, %s weights, %s math (asked: %s), %s decoder) on %s/%s with %d threads in %.1f s [%s]",
            bundle.path, bundle.format, bundle.weights, self.math_precision, self.precision, decoder, engine, device,
            threads,
            time.perf_counter() - t0, why,
        )
        defaults = bundle.defaults
        self.default_steps = int(defaults.get("steps", DEFAULT_STEPS))
        self.default_guidance = float(defaults.get("guidance", DEFAULT_GUIDANCE))
        self.default_scheduler = str(defaults.get("scheduler") or default_scheduler_name(bundle.scheduler_config))
        try:  # a bundle whose scheduler config our schedulers cannot read fails here, not at its first image
            make_scheduler(self.default_scheduler, bundle.scheduler_config)
        except (ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"bundle '{bundle.path}': scheduler/scheduler_config.json cannot drive the "
                              f"{self.default_scheduler} scheduler: {exc}") from None
        static = bundle.static_shape or {}
        side = min(max(bundle.native_size, v.MIN_SIDE), v.MAX_SIDE)
        self.default_size = (int(static.get("width", side)), int(static.get("height", side)))
        #: The bundle's own defaults, which :attr:`bundle_defaults` reads.
        self._own_defaults = (self.default_size, self.default_steps, self.default_guidance)

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: DeviceChoice = "auto",
        engine: EngineChoice = "auto",
        threads: int | None = None,
        decoder: DecoderChoice = "vae",
        precision: PrecisionChoice = "auto",
        cuda_graph: bool = False,
        compile_cache: str | Path | None = None,
        static_shapes: bool = False,
    ) -> Pipeline:
        """Load a bundle folder.

        ``device``: auto | cpu | cuda. ``engine``: auto | onnxruntime | openvino. ``threads``: the cap for both
        engines' op threads; None means the cores this process may use. ``decoder``: vae
        (the model's own) or taesd (about 18× cheaper, coarser pixels; the bundle must include it). ``precision``:
        auto (each engine's own default: OpenVINO uses bf16 on CPUs with AVX512-BF16/AMX) | fp32 (full precision,
        matches the reference) | bf16 (OpenVINO only). ``cuda_graph``: on CUDA, capture each static shape's kernel
        launches once and replay them (cuts launch overhead; costs GPU memory per shape). ``compile_cache``: a
        folder where OpenVINO keeps each compiled shape, so the next start (same bundle, same OpenVINO) loads it
        instead of compiling again; None compiles every time. ``static_shapes``: OpenVINO compiles each graph
        anew for every input shape it meets (each a copy of the weights) instead of once for all shapes.
        """
        bundle = Bundle.open(path)
        chosen_engine, chosen_device, why = choose(bundle.format, engine, device)
        if bundle.fusions == "cuda" and not chosen_device.startswith("cuda"):
            raise BundleError(
                f"bundle '{bundle.path}' was exported with --fusions cuda: its fused GroupNorm/NHWC ops have no CPU "
                f"kernels, so it runs on --device cuda only (here: {chosen_device}, {why}); for the CPU export it "
                "with --fusions none or cpu"
            )
        n_threads = parse_threads(threads) if threads is not None else default_threads()
        return cls(bundle, chosen_engine, chosen_device, n_threads, why, decoder, precision, cuda_graph,
                   None if compile_cache is None else Path(compile_cache), static_shapes)

    def _open(self, component: str) -> Session:
        graph = self.bundle.graph(component)
        cache = (compile_cache_dir(self.compile_cache, graph)
                 if self.compile_cache is not None and self.engine == "openvino" else None)
        return open_session(graph, self.engine, self.device, self.threads,  # type: ignore[arg-type]
                            self.precision, self.cuda_graph, cache, self.static_shapes)

    def generate(self, prompt: str, *, on_step: StepCallback | None = None, latents: np.ndarray | None = None,
                 **fields: Any) -> list[Image.Image]:
        """:meth:`run` for ``GenerationRequest(prompt=prompt, **fields)``, returning only the images."""
        return [g.image for g in self.run(GenerationRequest(prompt=prompt, **fields), on_step, latents)]

    #: An admin's choice given to :meth:`use_defaults`; None: the bundle's own.
    _chosen: Defaults | None = None

    @property
    def bundle_defaults(self) -> Defaults:
        """The bundle's own defaults (its manifest's, else the built-in ones), as read at load."""
        (width, height), steps, guidance = self._own_defaults
        return Defaults(width=width, height=height, steps=steps, guidance=guidance, scheduler=self.default_scheduler)

    @property
    def defaults(self) -> Defaults:
        """What requests that leave a field out get, every field set: the bundle's own or :meth:`use_defaults`'."""
        return self._chosen or self.bundle_defaults

    def use_defaults(self, wanted: Defaults) -> None:
        """Use these defaults for requests that leave them out (an admin's choice); a None field keeps the bundle's
        own. They are checked against the model as a request is (a static bundle's size, the scheduler's config);
        :class:`ConfigError` names what is not allowed. One value is swapped in whole: a request resolved before
        keeps what it got."""
        own = self.bundle_defaults
        merged = Defaults(**{name: getattr(own if getattr(wanted, name) is None else wanted, name)
                             for name in ("width", "height", "steps", "guidance", "scheduler")})
        try:
            self.resolve(GenerationRequest(prompt="defaults", width=merged.width, height=merged.height,
                                           steps=merged.steps, guidance=merged.guidance, seed=0,
                                           scheduler=merged.scheduler))
        except InvalidRequest as exc:
            raise ConfigError(f"default for {self.bundle.source_id}: {exc}") from None
        self._chosen = None if merged == own else merged

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """The request with the model's defaults filled in (a random seed where it has none), checked against what
        depends on the model: a bundle's static size, and whether the scheduler can read its config. A request that
        is resolved already comes back as it is (after the checks)."""
        filled = request
        if not request.resolved:
            d = self.defaults  # one value: a concurrent use_defaults cannot mix two choices in one request
            filled = replace(
                request,
                width=d.width if request.width is None else request.width,
                height=d.height if request.height is None else request.height,
                steps=d.steps if request.steps is None else request.steps,
                guidance=d.guidance if request.guidance is None else request.guidance,
                seed=secrets.randbelow(2**31) if request.seed is None else request.seed,
                scheduler=d.scheduler if request.scheduler is None else request.scheduler,
            )
        static = self.bundle.static_shape
        if static and (static.get("width"), static.get("height")) != (filled.width, filled.height):
            raise InvalidRequest(
                f"size {filled.size} is not allowed for this bundle; it was exported with static shapes for "
                f"{static.get('width')}x{static.get('height')} only"
            )
        if filled.scheduler != self.default_scheduler:  # the bundle's own one was built at load
            try:
                make_scheduler(str(filled.scheduler), self.bundle.scheduler_config)
            except (ValueError, TypeError, KeyError) as exc:
                raise InvalidRequest(f"scheduler '{filled.scheduler}' cannot run this model's scheduler config: "
                                     f"{exc}") from None
        return filled

    def run(self, request: GenerationRequest, on_step: StepCallback | None = None,
            latents: np.ndarray | None = None) -> list[Generated]:
        """Generate the request's images, each with its seed and the resolved request.

        Image ``i`` uses seed ``seed + i``, so any single image can be made again alone. ``latents`` replaces the
        seeded starting noise (shape (n, channels, height/f, width/f)), e.g. to reproduce another pipeline exactly.
        ``on_step(done, total)`` returning False raises :class:`GenerationCancelled` within one step.
        """
        r = self.resolve(request)
        assert r.width is not None and r.height is not None and r.seed is not None  # resolve fills every field
        f = self.bundle.vae_scale_factor
        shape = (r.n, self.bundle.latent_channels, r.height // f, r.width // f)
        seeds = [r.seed + i for i in range(r.n)]
        if latents is None:
            # One generator per image, so image i is the same whether made in a batch or alone with seed + i.
            noise = np.concatenate([np.random.Generator(np.random.PCG64(x)).standard_normal(
                (1, *shape[1:]), dtype=np.float32) for x in seeds])
        elif latents.shape != shape:
            raise InvalidRequest(f"latents of shape {latents.shape} do not fit; expected {shape}")
        else:
            noise = latents.astype(np.float32, copy=False)
        decoded = self._denoise(r, noise, on_step)
        return [Generated(Image.fromarray(img), x, r, self.bundle.source_id) for img, x in zip(decoded, seeds,
                                                                                                  strict=True)]

    def _denoise(self, r: GenerationRequest, noise: np.ndarray, on_step: StepCallback | None) -> np.ndarray:
        """The denoising loop, written out: encode, init latents, [UNet → guidance → scheduler step]*, decode."""
        n, steps, guidance = r.n, int(r.steps or 0), float(r.guidance or 0.0)
        # Guidance ≤ 1 adds nothing over the conditional prediction, so skip the unconditional half (sd-turbo: 0).
        cfg = guidance > 1.0
        cond = self._encode(r.prompt)
        # Classifier-free guidance runs uncond and cond as one UNet batch of 2n: one call instead of two.
        context = np.concatenate([self._encode(r.negative_prompt)] * n + [cond] * n) if cfg else \
            np.concatenate([cond] * n)
        # Converted once, not per step: the graph's dtype (fp32, or fp16 in fp16 ONNX graphs that take fp16 inputs).
        context = context.astype(self.unet.inputs["encoder_hidden_states"].dtype, copy=False)
        sample_dtype = self.unet.inputs["sample"].dtype
        sched: Scheduler = make_scheduler(str(r.scheduler), self.bundle.scheduler_config)
        sched.set_timesteps(steps)
        latents = noise * np.float32(sched.init_noise_sigma)
        unet_t = self.unet.inputs["timestep"]
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(np.concatenate([latents, latents]) if cfg else latents, t)
            # The timestep's dtype and rank come from the graph (float scalar in optimum exports, int64 elsewhere).
            t_in: np.ndarray = np.asarray(t, dtype=unet_t.dtype).reshape([1] * len(unet_t.shape))
            pred = self.unet.run({
                "sample": model_in.astype(sample_dtype, copy=False),
                "timestep": t_in,
                "encoder_hidden_states": context,
            })[0].astype(np.float32, copy=False)
            if cfg:
                uncond, text = pred[:n], pred[n:]
                pred = uncond + np.float32(guidance) * (text - uncond)
            latents = sched.step(pred, t, latents)
            if on_step is not None and on_step(i + 1, steps) is False:
                raise GenerationCancelled(f"stopped after step {i + 1} of {steps}")
        return self._decode(latents)

    def _encode(self, prompt: str) -> np.ndarray:
        ids = self.tokenizer.encode([prompt])
        spec = self.text_encoder.inputs["input_ids"]
        return self.text_encoder.run({"input_ids": ids.astype(spec.dtype)})[0].astype(np.float32)

    def _decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents → uint8 HWC images. The VAE runs one image at a time: at 512² its activations take GBs and a
        batch is no faster on the CPU."""
        spec = self.vae_decoder.inputs["latent_sample"]
        out = []
        for one in latents / np.float32(self._latent_scale):
            img = self.vae_decoder.run({"latent_sample": one[None].astype(spec.dtype)})[0][0].astype(np.float32)
            img = np.clip(img / 2 + 0.5, 0.0, 1.0)
            out.append((img.transpose(1, 2, 0) * 255).round().astype(np.uint8))
        return np.stack(out)

