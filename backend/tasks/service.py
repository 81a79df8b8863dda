"""The one core that turns a checked request into PNG images, shared by the Nextcloud worker, the standalone task
service and Python callers. It owns the loaded model, batches the images, reports progress as a fraction, stops
when told to, and keeps the measured speed that expected runtimes are estimated from."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from backend.config import Settings
from backend.images import png_bytes
from runtime.errors import InvalidRequest, T2IError, Unavailable
from runtime.request import Defaults, GenerationRequest
from runtime.validation import MAX_SIDE

if TYPE_CHECKING:
    from runtime import Bundle, Pipeline

log = logging.getLogger(__name__)

#: Called with the fraction done (0..1); returning False cancels the run within one denoising step.
ProgressCallback = Callable[[float], "bool | None"]


@dataclass(frozen=True)
class ImageResult:
    """One generated image as PNG bytes (with metadata) and its seed."""

    png: bytes
    seed: int
    width: int
    height: int


class ImageService:
    """A loaded model ready for requests. One run at a time per service; several services can share a machine
    (each with its own thread cap)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline: Pipeline | None = None
        # Re-entrant: a task service may run another user's short task between the batches of a long one.
        self._lock = threading.RLock()
        # Seconds per image-step at the model's native size, measured on this machine; None until measured.
        self._step_seconds: float | None = None
        self._decode_seconds: float | None = None
        self._calibrated: tuple[int, int, bool] | None = None  # the (width, height, guided) they were measured at

    # -- loading ---------------------------------------------------------------------------------------------------
    def load(self, progress: Callable[[int], None] | None = None, bundle: Path | None = None) -> None:
        """Get the configured model into the store (download/export as needed), load it and measure its speed.

        ``progress`` receives 0..100 for an init status.
        """
        from backend.loading import open_pipeline

        report = progress or (lambda _: None)
        report(1)
        # Resolving (download, conversion) reports up to 59; loading the graphs takes the rest up to 85.
        self.pipeline = open_pipeline(self.settings, progress=lambda f: report(1 + int(58 * f)), bundle=bundle)
        report(85)
        self.calibrate()
        report(100)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    @property
    def bundle(self) -> Bundle:
        """The loaded model's bundle."""
        return self._pipe().bundle

    def _pipe(self) -> Pipeline:
        if self.pipeline is None:
            raise Unavailable("the model is not loaded yet; try again when initialisation has finished")
        return self.pipeline

    @property
    def model_name(self) -> str:
        return self._pipe().bundle.source_id

    @property
    def defaults(self) -> Defaults:
        """The defaults the model's requests get now (every field set)."""
        return self._pipe().defaults

    @property
    def bundle_defaults(self) -> Defaults:
        """The model's own defaults, before any admin's choice."""
        return self._pipe().bundle_defaults

    def allowed_sizes(self) -> dict[str, str]:
        """Sizes offered to users, ``WIDTHxHEIGHT`` → a label that shows the shape: the model's native square
        first, then landscape and portrait at the common aspect ratios at the native scale, then other squares."""
        pipe = self._pipe()
        static = pipe.bundle.static_shape
        if static:
            size = f"{static['width']}x{static['height']}"
            return {size: size.replace("x", "×")}
        native = pipe.bundle_defaults.width or 0  # the model's own scale, whatever default an admin chose
        sizes = {f"{native}x{native}": f"{native}×{native} (square, native)"}
        for a, b in ASPECT_RATIOS:
            # The short side stays native (the scale the model was trained at) while the long side fits the limit.
            long, short = _side(native * a / b), native
            if long > MAX_SIDE:
                long, short = MAX_SIDE, _side(MAX_SIDE * b / a)
            sizes[f"{long}x{short}"] = f"{long}×{short} (landscape {a}:{b})"
            sizes[f"{short}x{long}"] = f"{short}×{long} (portrait {b}:{a})"
        for side in (256, 384, 512, 640, 768, 1024):
            sizes.setdefault(f"{side}x{side}", f"{side}×{side} (square)")
        return {size: label for size, label in sizes.items() if _fits(size)}

    # -- speed -----------------------------------------------------------------------------------------------------
    def calibrate(self) -> None:
        """Time one small run at the defaults requests get now, so expected runtimes are measured, not guessed.

        It runs twice and times the second: the first run of a shape compiles it where OpenVINO compiles per shape
        (~9 s for the full-size UNet on an AMX Xeon, where the run itself takes ~1 s) and repacks weights
        elsewhere. So the shape most requests use is ready before the first of them arrives."""
        pipe = self._pipe()
        with self._lock:
            d = pipe.defaults
            cfg = 2.0 if (d.guidance or 0) > 1 else 1.0

            def once() -> None:
                pipe.generate("calibration", n=1, width=d.width, height=d.height, steps=1, guidance=d.guidance,
                              seed=0, scheduler=d.scheduler)

            once()
            t0 = time.perf_counter()
            once()
            total = time.perf_counter() - t0
            # One run = text encoding + one step + decode. Split it as SD2's FLOPs do: the VAE decode costs about
            # three UNet evaluations at the same size; the text encoder is negligible.
            self._step_seconds = total / (cfg + 3.0) * cfg
            self._decode_seconds = total - self._step_seconds
            self._calibrated = self._shape_of(d)
        log.info("calibrated %s: %.2f s per step, %.2f s per decode at %dx%d", self.model_name,
                 self._step_seconds, self._decode_seconds, d.width, d.height)

    @staticmethod
    def _shape_of(d: Defaults) -> tuple[int, int, bool]:
        """What decides the graphs' input shapes: the size, and whether guidance doubles the UNet's batch."""
        return int(d.width or 0), int(d.height or 0), (d.guidance or 0) > 1

    def warm_defaults(self) -> bool:
        """Calibrate again when the defaults' shape changed since the last calibration (an admin chose another size
        or guidance), so their first request does not wait for a compile; True when it ran."""
        if self.pipeline is None or self._calibrated == self._shape_of(self.pipeline.defaults):
            return False
        self.calibrate()
        return True

    def expected_seconds(self, request: GenerationRequest) -> float:
        """Estimated wall time of ``request`` on this machine, from the step and decode times measured at the
        calibration's shape."""
        pipe = self._pipe()
        if self._calibrated is None:
            self.calibrate()
        assert self._step_seconds is not None and self._decode_seconds is not None and self._calibrated
        try:
            r = pipe.resolve(request)
        except InvalidRequest:  # refused when it runs; until then, estimate it at the model's own size
            r = pipe.resolve(replace(request, width=None, height=None, scheduler=None))
        width, height, cfg = self._calibrated
        assert r.width and r.height and r.steps and r.guidance is not None and width and height
        area = (r.width * r.height) / (width * height)
        cfg_factor = (2.0 if r.guidance > 1 else 1.0) / (2.0 if cfg else 1.0)
        per_image = r.steps * self._step_seconds * cfg_factor + self._decode_seconds
        return max(0.1, r.n * per_image * area)

    # -- running ---------------------------------------------------------------------------------------------------
    def run(self, request: GenerationRequest, on_progress: ProgressCallback | None = None,
            between_batches: Callable[[], None] | None = None) -> list[ImageResult]:
        """Generate the request's images in batches of at most ``settings.runtime.max_batch``;
        ``between_batches`` is called after each batch but the last (e.g. to serve someone else in between).

        The request is resolved once, first: every batch gets the same defaults even when an admin changes them
        meanwhile. Raises :class:`InvalidRequest` for input the model cannot take (e.g. a size its static graphs do
        not allow), :class:`GenerationCancelled` when ``on_progress`` returned False. Any other failure (an engine
        error, a damaged bundle) is not the user's input and propagates as it is.
        """
        pipe = self._pipe()
        with self._lock:
            r = pipe.resolve(request)
            assert r.steps is not None and r.seed is not None
            steps, most = r.steps, self.settings.runtime.max_batch
            batches = [min(most, r.n - i) for i in range(0, r.n, most)]
            total = steps * len(batches)
            results: list[ImageResult] = []
            for b, size in enumerate(batches):
                def step(done: int, _all: int, b: int = b) -> bool:
                    keep_going = on_progress((b * steps + done) / total) if on_progress else True
                    return keep_going is not False

                batch = r if size == r.n else replace(r, n=size, seed=r.seed + len(results))
                for item in pipe.run(batch, on_step=step):
                    w, h = item.image.size
                    marks = self.settings.images
                    results.append(ImageResult(png_bytes(item, marks.ai_marking, marks.watermark), item.seed, w, h))
                if between_batches is not None and b < len(batches) - 1:
                    between_batches()
            return results


#: Landscape aspect ratios offered besides the square (each also as portrait).
ASPECT_RATIOS = ((4, 3), (3, 2), (16, 9))


def _side(length: float) -> int:
    """The nearest multiple of 64 (what the VAE and UNet take)."""
    return max(64, round(length / 64) * 64)


def _fits(size: str) -> bool:
    from runtime.validation import parse_size

    try:
        parse_size(size)
    except T2IError:
        return False
    return True

