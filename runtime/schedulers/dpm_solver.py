"""DPM-Solver++(2M): diffusers' ``DPMSolverMultistepScheduler`` (algorithm_type "dpmsolver++") in numpy."""

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

# DPMSolverMultistepScheduler.__init__'s defaults in diffusers 0.35.2.
DPM_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "algorithm_type": "dpmsolver++",
    "solver_type": "midpoint",
    "lower_order_final": True,
    "euler_at_final": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "variance_type": None,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
}


def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """(α_t, σ_t) of the variance-preserving process from the variance-exploding σ: α = 1/√(σ²+1), σ_t = σ·α."""
    alpha = ONE / np.sqrt(sigma * sigma + ONE)
    return alpha, sigma * alpha


# diffusers takes log and exp of 0-dim float32 tensors; torch rounds those (glibc, Sleef) to within 1 ulp of the
# exact value, as does numpy's float32 SIMD code, but they disagree in a third of the cases. Evaluating in float64
# and rounding once agrees with torch far more often, which keeps the two bit-identical over more steps.
def _log_f32(x: np.float32) -> np.float32:
    with np.errstate(divide="ignore"):  # log σ_t at σ = 0 is −∞, which the update handles
        return F32(np.log(np.float64(x)))


def _exp_f32(x: np.float32) -> np.float32:
    return F32(np.exp(np.float64(x)))


def _log_snr(sigma: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """(α_t, σ_t, λ_t) with λ_t = log α_t − log σ_t, the half log-SNR the solver integrates over (+∞ at σ = 0)."""
    alpha, sigma_t = _alpha_sigma(sigma)
    return alpha, sigma_t, _log_f32(alpha) - _log_f32(sigma_t)


class DPMSolverMultistepScheduler:
    """Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", algorithm 2) of order 1 or 2, deterministic, in the data-prediction (x̂₀) form.

    Each step integrates the ODE exactly in λ (half log-SNR) for the linear part and approximates x̂₀ as constant
    (order 1, which is DDIM) or linear in λ using the previous step's x̂₀ (order 2, "2M"). The first step, and with
    ``final_sigmas_type`` "zero" also the last one, fall back to order 1: there is no history yet, and the final jump
    to σ = 0 has an infinite λ. ``use_karras_sigmas`` picks the noise levels of Karras et al. 2022 ("2M Karras").
    """

    def __init__(self, config: Mapping[str, Any], **overrides: Any) -> None:
        cfg = SchedulerConfig(type(self).__name__, config, DPM_DEFAULTS, overrides)
        self.prediction_type = cfg.prediction_type()
        self._spacing = cfg.spacing()
        cfg.require("algorithm_type", "dpmsolver++", "deis")  # diffusers maps "deis" to "dpmsolver++"
        self._order = int(cfg.require("solver_order", 1, 2))
        # diffusers maps the UniPC/DEIS solver types to "midpoint".
        solver_type = cfg.require("solver_type", "midpoint", "heun", "logrho", "bh1", "bh2")
        self._heun = solver_type == "heun"
        cfg.require("thresholding", False)
        cfg.require("variance_type", None)
        for key in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas"):
            cfg.require(key, False, None)
        self._final_sigma_type = cfg.require("final_sigmas_type", "zero", "sigma_min")
        self._lower_order_final = bool(cfg["lower_order_final"])
        self._euler_at_final = bool(cfg["euler_at_final"])
        self._karras = bool(cfg["use_karras_sigmas"])
        # Not arguments of this class in diffusers, yet its Karras code reads them off the config when the file has
        # them (an Euler config's "sigma_min"/"sigma_max" survive from_config as hidden keys).
        self._sigma_min, self._sigma_max = cfg.extra("sigma_min"), cfg.extra("sigma_max")
        self._cosine = cfg["beta_schedule"] == "squaredcos_cap_v2"
        self._lambda_min_clipped = float(cfg["lambda_min_clipped"])
        self._steps_offset = int(cfg["steps_offset"])
        self._num_train = int(cfg["num_train_timesteps"])

        alphas_cumprod = train_alphas_cumprod(cfg)
        if cfg["rescale_betas_zero_snr"]:
            alphas_cumprod[-1] = 2.0**-24  # keeps σ_T and λ_T finite
        # λ_t of every training timestep, for lambda_min_clipped.
        self._train_lambdas = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(ONE - alphas_cumprod))
        self._train_sigmas = train_sigmas(alphas_cumprod)
        self.init_noise_sigma = 1.0  # variance-preserving: the latents start as unit noise
        self.timesteps = np.arange(self._num_train - 1, -1, -1, dtype=np.int64)
        self._sigmas = self._train_sigmas
        self._reset()

    def _reset(self) -> None:
        self._step_index: int | None = None
        self._prev_x0: np.ndarray | None = None  # x̂₀ of the previous step, the "M" (multistep) history
        self._lower_order_nums = 0  # steps taken so far, capped at the order

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = int(num_inference_steps)
        # Timesteps whose λ is below lambda_min_clipped are never used (matters for the cosine schedule only).
        clipped = int(np.searchsorted(self._train_lambdas[::-1], self._lambda_min_clipped))
        last = self._num_train - clipped
        if self._spacing == "trailing":
            timesteps = spaced_timesteps("trailing", n, self._num_train, self._steps_offset, last)
        else:
            # n + 1 points of which the smallest is dropped: the schedule ends one stride above t = 0.
            timesteps = spaced_timesteps(self._spacing, n + 1, self._num_train, self._steps_offset, last)[:-1]
        timesteps = timesteps.round().astype(np.int64)
        if self._karras:
            # Karras noise levels across the whole training range; the UNet sees the nearest whole timestep of
            # each σ (fractional for the cosine schedule), while the update uses the exact σ.
            lo = float(self._train_sigmas[0]) if self._sigma_min is None else self._sigma_min
            hi = float(self._train_sigmas[-1]) if self._sigma_max is None else self._sigma_max
            sigmas = karras_sigmas(lo, hi, n)
            t = sigma_to_t(sigmas, np.log(self._train_sigmas))
            timesteps = (t if self._cosine else t.round()).astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(self._num_train), self._train_sigmas)
        final = 0.0 if self._final_sigma_type == "zero" else self._train_sigmas[0]
        self._sigmas = np.append(sigmas, final).astype(F32)
        self.timesteps = timesteps
        self._reset()

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """Identity: DPM-Solver works on the variance-preserving sample the UNet takes as is."""
        return sample

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """x̂₀ from the model output: (x − σ_t·ε)/α_t for ε-prediction, α_t·x − σ_t·v for v-prediction."""
        alpha_t, sigma_t = _alpha_sigma(sigma)
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

    def step(self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray) -> np.ndarray:
        """One DPM-Solver++ step (order 1 or 2) from the current noise level to the next; returns float32."""
        if self._step_index is None:
            index = index_for_timestep(self.timesteps, timestep)
            # diffusers starts at the last step when the timestep is not in the schedule.
            self._step_index = len(self.timesteps) - 1 if index is None else index
        i, n = self._step_index, len(self.timesteps)
        # 1. Order of this step: 1 without history, and 1 for the final step when asked to (or forced: σ = 0).
        final_first_order = i == n - 1 and (
            self._euler_at_final or (self._lower_order_final and n < 15) or self._final_sigma_type == "zero")
        second_order = self._order == 2 and self._lower_order_nums >= 1 and not final_first_order
        # 2. D₀ = x̂₀(x_s, s): the model output turned into a data prediction at the current noise level s.
        x0 = self._data_prediction(model_output, sample, self._sigmas[i])
        x = sample.astype(F32, copy=False)
        # 3. α, σ, λ at the current level s₀ = s_i and the target t = s_{i+1}; h = λ_t − λ_{s₀} is the step in λ.
        alpha_t, sigma_t, lambda_t = _log_snr(self._sigmas[i + 1])
        _, sigma_s0, lambda_s0 = _log_snr(self._sigmas[i])
        h = lambda_t - lambda_s0
        phi = alpha_t * (_exp_f32(-h) - ONE)  # α_t(e^{−h} − 1), the weight of x̂₀ in the exact linear part
        # 4. x_t = (σ_t/σ_{s₀})·x_{s₀} − α_t(e^{−h} − 1)·D₀ (eq. 9 of the paper, the first-order update = DDIM).
        prev_sample = (sigma_t / sigma_s0) * x - phi * x0
        if second_order:
            # 5. Second-order correction from the previous x̂₀ at s₁ = s_{i−1}: r₀ = h₀/h with h₀ = λ_{s₀} − λ_{s₁},
            #    D₁ = (D₀ − x̂₀(s₁))/r₀ is the finite difference of x̂₀ in λ, scaled to the step h.
            assert self._prev_x0 is not None
            _, _, lambda_s1 = _log_snr(self._sigmas[i - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (ONE / r0) * (x0 - self._prev_x0)
            if self._heun:
                prev_sample = prev_sample + (alpha_t * ((_exp_f32(-h) - ONE) / h + ONE)) * d1
            else:  # midpoint: −½·α_t(e^{−h} − 1)·D₁
                prev_sample = prev_sample - (F32(0.5) * phi) * d1
        self._prev_x0 = x0
        self._lower_order_nums = min(self._lower_order_nums + 1, self._order)
        self._step_index = i + 1
        return prev_sample.astype(x0.dtype, copy=False)
