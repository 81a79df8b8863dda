"""Prompt → images from an exported bundle: tokenizer, text encoder, the denoising loop, the VAE decoder."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from runtime import validation as v
from runtime.bundle import Bundle
from runtime.engines import (
    Session,
    check_precision,
    choose,
    default_threads,
    open_session,
    openvino_math_precision,
    parse_threads,
)
from runtime.errors import BundleError, ConfigError, GenerationCancelled, InvalidRequest
from runtime.options import LoadOptions
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

    def __init__(self, bundle: Bundle, options: LoadOptions, tokenizer: ClipTokenizer, sessions: dict[str, Session],
                 latent_scale: float) -> None:
        """The pipeline of parts :meth:`load` opened: ``options`` as resolved there (the engine and device chosen,
        the thread count), the ``text_encoder``, ``unet`` and ``decoder`` sessions, and the factor the latents are
        divided by before the decoder."""
        self.bundle = bundle
        self.options = options
        self.engine, self.device, self.threads = options.engine, options.device, options.threads
        self.tokenizer = tokenizer
        self.text_encoder = sessions["text_encoder"]
        self.unet = sessions["unet"]
        self.vae_decoder = sessions["decoder"]
        self._latent_scale = latent_scale
        #: The bundle's own defaults (its manifest's, else the built-in ones), as read at load.
        self.bundle_defaults = own_defaults(bundle)
        #: An admin's choice given to :meth:`use_defaults`; None: the bundle's own.
        self._chosen: Defaults | None = None

    @property
    def math_precision(self) -> str:
        """What the engine really computes in: OpenVINO picks by the CPU (see openvino_math_precision); onnxruntime
        runs the graph's own types."""
        if self.engine == "openvino":
            return openvino_math_precision(self.options.precision)
        return self.bundle.precision

    @classmethod
    def load(cls, path: str | Path, options: LoadOptions | None = None, *, cache: Path | None = None,
             **changes: Any) -> Pipeline:
        """Load a bundle folder as ``options`` say (see :class:`LoadOptions`: by default the device and engine are
        chosen, every core this process may use runs ops, with the model's own VAE decoder and each engine's own
        precision). Keyword arguments change single options: ``Pipeline.load(path, device="cpu", threads=2)``.
        ``cache`` is the folder where OpenVINO keeps its compiled models when ``compile_cache`` is on.

        Every option is checked before a graph is opened; :class:`ConfigError` (or :class:`BundleError`,
        :class:`EngineError`) names what is not allowed.
        """
        options = _changed(options or LoadOptions(), changes)
        bundle = Bundle.open(path)
        engine, device, why = choose(bundle.format, options.engine, options.device)
        if bundle.fusions == "cuda" and not device.startswith("cuda"):
            raise BundleError(
                f"bundle '{bundle.path}' was exported with --fusions cuda: its fused GroupNorm/NHWC ops have no CPU "
                f"kernels, so it runs on --device cuda only (here: {device}, {why}); for the CPU export it "
                "with --fusions none or cpu"
            )
        threads = parse_threads(options.threads) if options.threads else default_threads()
        if options.cuda_graph and not device.startswith("cuda"):
            raise ConfigError(f"CUDA graphs need --device cuda; this pipeline runs on {device}")
        precision = check_precision(options.precision, engine)
        decoder = options.decoder
        if decoder not in DECODERS:
            raise ConfigError(f"decoder '{decoder}' is not known; use one of {', '.join(DECODERS)}")
        if not bundle.has(DECODERS[decoder]):
            raise BundleError(f"bundle '{bundle.path}' has no {decoder} decoder ({DECODERS[decoder]}/); export it "
                              "with `text2image export SOURCE --taesd madebyollin/taesd` or use --decoder vae")
        if options.compile_cache and cache is None:
            raise ConfigError("compile_cache needs a folder to keep the compiled models in (Pipeline.load's cache)")
        options = replace(options, engine=engine, device=device, threads=threads)
        t0 = time.perf_counter()
        tokenizer = ClipTokenizer.load(bundle.path / "tokenizer")
        parts = {"text_encoder": "text_encoder", "unet": "unet", "decoder": DECODERS[decoder]}
        sessions = {key: open_session(bundle.graph(component), options, cache) for key, component in parts.items()}
        # The factor the latents were scaled by for the UNet; TAESD was trained on the scaled latents (factor 1).
        latent_scale = (bundle.vae_scaling_factor if decoder == "vae"
                        else float(bundle.component_config(DECODERS[decoder]).get("scaling_factor", 1.0)))
        pipe = cls(bundle, options, tokenizer, sessions, latent_scale)
        if precision == "bf16" and pipe.math_precision != "bf16":
            log.warning("precision bf16 was asked for, but this CPU has no native bf16 (AMX or AVX512-BF16): "
                        "OpenVINO computes in %s", pipe.math_precision)
        log.info(
            "loaded %s (%s, %s weights, %s math (asked: %s), %s decoder) on %s/%s with %d threads in %.1f s [%s]%s",
            bundle.path, bundle.format, bundle.weights, pipe.math_precision, precision, decoder, engine, device,
            threads, time.perf_counter() - t0, why, _compile_note(options) if engine == "openvino" else "",
        )
        return pipe

    def generate(self, prompt: str, *, on_step: StepCallback | None = None, latents: np.ndarray | None = None,
                 **fields: Any) -> list[Image.Image]:
        """:meth:`run` for ``GenerationRequest(prompt=prompt, **fields)``, returning only the images."""
        return [g.image for g in self.run(GenerationRequest(prompt=prompt, **fields), on_step, latents)]

    @property
    def defaults(self) -> Defaults:
        """What requests that leave a field out get, every field set: the bundle's own or :meth:`use_defaults`'."""
        return self._chosen or self.bundle_defaults

    def use_defaults(self, wanted: Defaults) -> None:
        """Use these defaults for requests that leave them out (an admin's choice); a None field keeps the bundle's
        own. They are checked against the model as a request is (a static bundle's size, the scheduler's config);
        :class:`InvalidRequest` names what is not allowed, as for a request. One value is swapped in whole: a request
        resolved before keeps what it got."""
        own = self.bundle_defaults
        merged = Defaults(**{name: getattr(own if getattr(wanted, name) is None else wanted, name)
                             for name in ("width", "height", "steps", "guidance", "scheduler")})
        self.resolve(GenerationRequest(prompt="defaults", width=merged.width, height=merged.height,
                                       steps=merged.steps, guidance=merged.guidance, seed=0,
                                       scheduler=merged.scheduler))
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
        if filled.scheduler != self.bundle_defaults.scheduler:  # the bundle's own one was built at load
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


def own_defaults(bundle: Bundle) -> Defaults:
    """The defaults ``bundle`` brings (its manifest's, else the built-in ones), every field set. A bundle whose
    scheduler config our schedulers cannot read is a :class:`BundleError` here, not at its first image."""
    defaults = bundle.defaults
    scheduler = str(defaults.get("scheduler") or default_scheduler_name(bundle.scheduler_config))
    try:
        make_scheduler(scheduler, bundle.scheduler_config)
    except (ValueError, TypeError, KeyError) as exc:
        raise BundleError(f"bundle '{bundle.path}': scheduler/scheduler_config.json cannot drive the "
                          f"{scheduler} scheduler: {exc}") from None
    static = bundle.static_shape or {}
    side = min(max(bundle.native_size, v.MIN_SIDE), v.MAX_SIDE)
    return Defaults(width=int(static.get("width", side)), height=int(static.get("height", side)),
                    steps=int(defaults.get("steps", DEFAULT_STEPS)),
                    guidance=float(defaults.get("guidance", DEFAULT_GUIDANCE)), scheduler=scheduler)


def _compile_note(options: LoadOptions) -> str:
    """How OpenVINO compiles, and why (the static_shapes choice, decided per CPU when auto)."""
    from runtime.engines.openvino import static_by_default, static_shapes_on

    per_shape = static_shapes_on(options.static_shapes)
    how = "compiled per image size and batch" if per_shape else "compiled once for every image size"
    if options.static_shapes != "auto":
        return f"; {how} (static_shapes={options.static_shapes})"
    return f"; {how} ({'this CPU has AMX' if static_by_default() else 'this CPU has no AMX'})"


def _changed(options: LoadOptions, changes: dict[str, Any]) -> LoadOptions:
    """``options`` with the named fields changed; an unknown name is a :class:`ConfigError` listing the known."""
    known = [f.name for f in fields(LoadOptions)]
    unknown = sorted(set(changes) - set(known))
    if unknown:
        raise ConfigError(f"load option {', '.join(map(repr, unknown))} is not known; use {', '.join(known)}")
    return replace(options, **changes) if changes else options
