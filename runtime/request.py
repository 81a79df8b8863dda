"""The one request type: what to generate, checked once, where it is made.

Every front end only *parses* its input (click options, a Nextcloud task's input, the standalone API's form) into a
:class:`GenerationRequest`; making one checks every field it sets, with messages that name the value and what is
allowed. :meth:`runtime.Pipeline.resolve` then fills in the model's defaults (and checks what depends on the model,
such as a bundle's static size); the filled request travels with each image (``Generated.request``) into its PNG.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime import validation as v
from runtime.errors import InvalidRequest
from runtime.schedulers import SCHEDULER_NAMES


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """What to generate. None means the model's default (size, steps, guidance, scheduler) or a random seed.

    Image ``i`` of a request uses seed ``seed + i``, so each image can be made again alone.
    """

    prompt: str  # required: kw_only lets it stand before the fields with defaults
    negative_prompt: str = ""
    n: int = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        v.check_prompt("prompt", self.prompt)
        if not self.prompt.strip():
            raise InvalidRequest("the prompt is empty; describe the image you want")
        v.check_prompt("negative prompt", self.negative_prompt)
        v.check_count(self.n)
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                v.check_side(name, getattr(self, name))
        if self.steps is not None:
            v.check_steps(self.steps)
        if self.guidance is not None:
            object.__setattr__(self, "guidance", v.check_guidance(self.guidance))
        if self.seed is not None:
            v.check_seed(self.seed)
        if self.scheduler is not None and self.scheduler not in SCHEDULER_NAMES:
            raise InvalidRequest(f"scheduler {v.shown(self.scheduler)} is not known; use one of "
                                 f"{', '.join(SCHEDULER_NAMES)}")
        # Last, as it joins two fields that are each fine: a bad field is named as such first.
        if self.seed is not None and self.seed + self.n - 1 > v.MAX_SEED:  # image i uses seed + i, a seed too
            raise InvalidRequest(f"seed {self.seed} is too large for {self.n} images (image i uses seed+i); use "
                                 f"0 to {v.MAX_SEED - self.n + 1}")

    @property
    def size(self) -> str:
        """``WIDTHxHEIGHT`` (of a resolved request)."""
        return f"{self.width}x{self.height}"

    @property
    def resolved(self) -> bool:
        """Whether every default is filled in (see :meth:`runtime.Pipeline.resolve`)."""
        return None not in (self.width, self.height, self.steps, self.guidance, self.seed, self.scheduler)


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """What a request that leaves a field out gets: a model's defaults (:attr:`runtime.Pipeline.defaults`, every
    field set) or an admin's choice of them (None keeps the model's own). Each value is checked as a request's is."""

    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        checked = GenerationRequest(prompt="defaults", width=self.width, height=self.height, steps=self.steps,
                                    guidance=self.guidance, scheduler=self.scheduler)
        object.__setattr__(self, "guidance", checked.guidance)

    @property
    def size(self) -> str:
        """``WIDTHxHEIGHT`` (of a model's defaults)."""
        return f"{self.width}x{self.height}"
