"""DDIM: diffusers' ``DDIMScheduler`` (η = 0) in numpy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from runtime.schedulers.base import F32, ONE, SchedulerConfig, Timestep, spaced_timesteps, train_alphas_cumprod

# DDIMScheduler.__init__'s defaults in diffusers 0.35.2. Note clip_sample and set_alpha_to_one default to True and
# timestep_spacing to "leading", unlike the Euler and DPM defaults.
DDIM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


class DDIMScheduler:
    """Denoising diffusion implicit models (Song et al. 2021, "Denoising Diffusion Implicit Models"), deterministic
    (η = 0): eq. 12 with σ_t = 0, i.e. predict x₀, then re-noise it to the previous timestep along the predicted ε.
    """

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        cfg = SchedulerConfig(type(self).__name__, config, DDIM_DEFAULTS, overrides)
        self.prediction_type = cfg.prediction_type()
        self._spacing = cfg.spacing()
        cfg.require("thresholding", False)
        self._clip_range = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        self._steps_offset = int(cfg["steps_offset"])
        self._num_train = int(cfg["num_train_timesteps"])
        self._alphas_cumprod = train_alphas_cumprod(cfg)
        # ᾱ "before" t = 0, used by the last step: 1 (a clean sample) or, as SD's configs ask, ᾱ_0.
        self._final_alpha_cumprod = ONE if cfg["set_alpha_to_one"] else self._alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.timesteps = np.arange(self._num_train - 1, -1, -1, dtype=np.int64)
        self._num_inference_steps: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        if n > self._num_train:
            raise ValueError(f"num_inference_steps {n} cannot exceed num_train_timesteps {self._num_train}")
        timesteps = spaced_timesteps(self._spacing, n, self._num_train, self._steps_offset)
        self.timesteps = timesteps.round().astype(np.int64)
        self._num_inference_steps = n

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """Identity: DDIM works on the variance-preserving sample the UNet takes as is."""
        return sample

    def step(self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray) -> np.ndarray:
        """One DDIM step from ``timestep`` to ``timestep − T/n``; returns the float32 sample there."""
        if self._num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        t = int(timestep)
        # 1. The previous timestep t − T/n. diffusers uses this stride for every spacing, even where the schedule's
        #    real next timestep differs ("linspace", "trailing" with uneven strides); kept so results match.
        prev_t = t - self._num_train // self._num_inference_steps
        # 2. ᾱ_t, ᾱ_{t−1} and β_t = 1 − ᾱ_t.
        alpha_prod_t = self._alphas_cumprod[t]
        alpha_prod_t_prev = self._alphas_cumprod[prev_t] if prev_t >= 0 else self._final_alpha_cumprod
        beta_prod_t = ONE - alpha_prod_t
        # 3. "predicted x_0" and the ε it implies (eq. 12); for v = √ᾱ·ε − √(1−ᾱ)·x₀ both are linear in (x, v).
        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        else:
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample
        # 4. Clip x₀ to the data range when the config asks (pixel-space models; SD's configs turn it off).
        if self._clip_range is not None:
            r = F32(self._clip_range)
            pred_original_sample = np.clip(pred_original_sample, -r, r)
        # 5. σ_t = η·√variance = 0: deterministic DDIM adds no fresh noise.
        # 6. "direction pointing to x_t": √(1 − ᾱ_{t−1} − σ_t²)·ε with σ_t = 0.
        pred_sample_direction = np.sqrt(ONE - alpha_prod_t_prev) * pred_epsilon
        # 7. x_{t−1} = √ᾱ_{t−1}·x̂₀ + direction.
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
        return prev_sample.astype(F32, copy=False)
