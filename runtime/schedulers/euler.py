"""Euler sampler over Karras sigmas: diffusers' ``EulerDiscreteScheduler`` (s_churn = 0) in numpy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.schedulers.base import (
    F32,
    ONE,
    SchedulerConfig,
    Timestep,
    index_for_timestep,
    karras_sigmas,
    sigma_to_t,
    spaced_timesteps,
    train_alphas_cumprod,
    train_sigmas,
)

# EulerDiscreteScheduler.__init__'s defaults in diffusers 0.35.2: what a key missing from the config becomes.
EULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "timestep_spacing": "linspace",
    "timestep_type": "discrete",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
}


class EulerDiscreteScheduler:
    """First-order Euler steps of the probability-flow ODE dx/dσ = (x − x̂₀)/σ (Karras et al. 2022, algorithm 1
    without churn), in the variance-exploding parametrisation x = x̂₀ + σ·ε that k-diffusion and diffusers use.

    The UNet was trained on variance-preserving inputs, so :meth:`scale_model_input` divides by √(σ² + 1), and the
    latents start at ``init_noise_sigma`` ≈ σ_max (≈ 14.6 for Stable Diffusion) rather than 1.
    """

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        cfg = SchedulerConfig(type(self).__name__, config, EULER_DEFAULTS, overrides)
        self.prediction_type = cfg.prediction_type()
        self._spacing = cfg.spacing()
        cfg.require("interpolation_type", "linear")
        cfg.require("timestep_type", "discrete")
        cfg.require("use_exponential_sigmas", False, None)
        cfg.require("use_beta_sigmas", False, None)
        self._final_sigma_type = cfg.require("final_sigmas_type", "zero", "sigma_min")
        self._karras = bool(cfg["use_karras_sigmas"])
        self._sigma_min, self._sigma_max = cfg["sigma_min"], cfg["sigma_max"]
        self._steps_offset = int(cfg["steps_offset"])
        self._num_train = int(cfg["num_train_timesteps"])

        alphas_cumprod = train_alphas_cumprod(cfg)
        if cfg["rescale_betas_zero_snr"]:
            # ᾱ_T = 0 would make σ_T infinite; diffusers pins it to 2⁻²⁴ instead (σ_T ≈ 4096).
            alphas_cumprod[-1] = 2.0**-24
        self._train_sigmas = train_sigmas(alphas_cumprod)  # ascending in t
        # Before set_timesteps: the full training schedule, as diffusers has it.
        self.timesteps = np.linspace(0, self._num_train - 1, self._num_train, dtype=F32)[::-1].copy()
        self._sigmas = np.append(self._train_sigmas[::-1], F32(0))
        self._step_index: int | None = None

    @property
    def init_noise_sigma(self) -> float:
        sigma_max = self._sigmas.max()
        # diffusers starts from σ_max·noise for "linspace"/"trailing" (k-diffusion's convention) but keeps its older
        # √(σ_max² + 1), the std of x̂₀ + σ·ε for unit-variance x̂₀, for "leading". Both are matched as they are.
        if self._spacing in ("linspace", "trailing"):
            return float(sigma_max)
        return float(np.sqrt(sigma_max * sigma_max + ONE))

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        timesteps = spaced_timesteps(self._spacing, n, self._num_train, self._steps_offset).astype(F32)
        # σ at fractional timesteps: linear interpolation in the training table (float64, like diffusers).
        sigmas = np.interp(timesteps, np.arange(self._num_train), self._train_sigmas)
        if self._karras:
            # The Karras ramp spans the sigmas just picked (not the whole training range) unless the config pins it;
            # the UNet then sees the fractional timestep of each new σ.
            lo = float(sigmas[-1]) if self._sigma_min is None else self._sigma_min
            hi = float(sigmas[0]) if self._sigma_max is None else self._sigma_max
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, np.log(self._train_sigmas)).astype(F32)
        # The last step lands on σ = 0 (a clean sample) or, with "sigma_min", on the smallest training σ.
        final = 0.0 if self._final_sigma_type == "zero" else self._train_sigmas[0]
        self._sigmas = np.append(sigmas, final).astype(F32)
        self.timesteps = timesteps
        self._step_index = None

    def _index(self, timestep: Timestep) -> int:
        # The step counter starts at the position of the first timestep seen, then just counts.
        if self._step_index is None:
            index = index_for_timestep(self.timesteps, timestep)
            if index is None:
                raise ValueError(f"timestep {timestep} is not in this scheduler's timesteps")
            self._step_index = index
        return self._step_index

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """x / √(σ² + 1): the variance-preserving input the UNet was trained on."""
        sigma = self._sigmas[self._index(timestep)]
        return sample / np.sqrt(sigma * sigma + ONE)

    def step(self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray) -> np.ndarray:
        """One Euler step from σ_i to σ_{i+1}; returns the float32 sample at the next timestep."""
        if isinstance(timestep, (int, np.integer)):
            # As in diffusers: an integer here is almost surely a loop index, not an element of self.timesteps.
            raise ValueError("pass an element of scheduler.timesteps as the timestep, not an integer index")
        i = self._index(timestep)
        x = sample.astype(F32, copy=False)
        # 1. σ_i and σ_{i+1}; without churn σ̂ = σ_i (no noise is added back).
        sigma, sigma_next = self._sigmas[i], self._sigmas[i + 1]
        # 2. x̂₀, the denoised sample predicted from the model output.
        if self.prediction_type == "epsilon":
            x0 = x - sigma * model_output
        else:  # v = α·ε − σ_vp·x₀ with α = 1/√(σ²+1), σ_vp = σ/√(σ²+1) and x = x_vp·√(σ²+1)
            x0 = model_output * (-sigma / np.sqrt(sigma * sigma + ONE)) + x / (sigma * sigma + ONE)
        # 3. d = (x − x̂₀)/σ, the ODE's derivative dx/dσ.
        derivative = (x - x0) / sigma
        # 4. Euler step over dt = σ_{i+1} − σ_i (negative: towards less noise).
        prev_sample = x + derivative * (sigma_next - sigma)
        self._step_index = i + 1
        return prev_sample.astype(model_output.dtype, copy=False)
