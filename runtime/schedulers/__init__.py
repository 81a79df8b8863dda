"""Torch-free noise schedulers that reproduce diffusers 0.35.2 step for step.

>>> s = make_scheduler("dpm++2m-karras", bundle.scheduler_config)
>>> s.set_timesteps(20)

A bundle's ``scheduler_config.json`` may belong to any diffusers scheduler class (SD 1.x ships PNDMScheduler); each
scheduler here reads it the way ``Target.from_config(config)`` does in diffusers, so the same file drives every name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from runtime.schedulers.base import PredictionType, Scheduler
from runtime.schedulers.ddim import DDIMScheduler
from runtime.schedulers.dpm_solver import DPMSolverMultistepScheduler
from runtime.schedulers.euler import EulerDiscreteScheduler

SCHEDULER_NAMES = ("euler", "dpm++2m", "dpm++2m-karras", "ddim")

__all__ = [
    "SCHEDULER_NAMES",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "PredictionType",
    "Scheduler",
    "default_scheduler_name",
    "make_scheduler",
]


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """The scheduler called ``name`` (one of :data:`SCHEDULER_NAMES`), set up from a bundle's scheduler config.

    The DPM names fix what the name promises, whatever the file says: DPM-Solver++ of order 2, with Karras sigmas
    for "dpm++2m-karras" only (as ``DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=...)``).
    Raises ValueError for an unknown name or a config asking for a feature these schedulers do not implement.
    """
    if name == "euler":
        return EulerDiscreteScheduler(config)
    if name in ("dpm++2m", "dpm++2m-karras"):
        return DPMSolverMultistepScheduler(config, algorithm_type="dpmsolver++", solver_order=2,
                                           use_karras_sigmas=name == "dpm++2m-karras")
    if name == "ddim":
        return DDIMScheduler(config)
    raise ValueError(f"scheduler '{name}' is not known; use one of {', '.join(SCHEDULER_NAMES)}")


def default_scheduler_name(config: Mapping[str, Any]) -> str:
    """The name matching the class that wrote the config; DPM-Solver++ 2M for any other class (PNDM, LMS, …)."""
    cls = config.get("_class_name")
    if cls == "EulerDiscreteScheduler":
        return "euler"
    if cls == "DDIMScheduler":
        return "ddim"
    if cls == "DPMSolverMultistepScheduler" and config.get("use_karras_sigmas"):
        return "dpm++2m-karras"
    return "dpm++2m"
