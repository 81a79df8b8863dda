"""Shared pieces of the numpy schedulers: config reading, the training noise schedule, timestep spacings.

Everything here reproduces diffusers 0.35.2 (``diffusers/schedulers/scheduling_*.py``) value for value, including
its dtype choices: the training schedule and every per-step coefficient are float32, as diffusers computes them with
float32 torch tensors, while the sigma interpolation and the Karras schedule are float64 numpy, as in diffusers.
Where torch's CPU kernels round differently from the obvious numpy call (``linspace``, ``cumprod``), the torch
rounding is emulated so the schedules agree bit for bit and not only within a tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, Protocol, get_args

import numpy as np

PredictionType = Literal["epsilon", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
TimestepSpacing = Literal["linspace", "leading", "trailing"]
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)

# A timestep as the denoising loop hands it back: an element of ``Scheduler.timesteps`` (numpy scalar) or a number.
Timestep = float | int | np.number | np.ndarray

F32 = np.float32
ONE = np.float32(1.0)  # float32 constants keep scalar arithmetic in float32 under numpy 1.x promotion rules too


class Scheduler(Protocol):
    """What the denoising loop needs from a scheduler (diffusers' semantics, numpy arrays instead of tensors).

    The loop::

        s.set_timesteps(n)
        latents = noise * np.float32(s.init_noise_sigma)
        for t in s.timesteps:
            eps = unet(s.scale_model_input(latents, t), t)
            latents = s.step(eps, t, latents)
    """

    prediction_type: PredictionType
    timesteps: np.ndarray  # the UNet's ``timestep`` values: float32 for Euler, int64 for DDIM and DPM-Solver

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the initial noise; the first latents are ``noise * init_noise_sigma``."""
        ...

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Build the schedule for ``num_inference_steps`` steps; also forgets the step counter and any history."""
        ...

    def scale_model_input(self, sample: np.ndarray, timestep: Timestep) -> np.ndarray:
        """The UNet's input for ``sample`` at ``timestep``."""
        ...

    def step(self, model_output: np.ndarray, timestep: Timestep, sample: np.ndarray) -> np.ndarray:
        """One denoising step: the sample at the next (less noisy) timestep, float32."""
        ...


class SchedulerConfig:
    """The settings one scheduler class reads from a bundle's ``scheduler_config.json``.

    It resolves keys the way diffusers' ``Target.from_config(config, **overrides)`` does, whichever class wrote the
    file: an override wins, then a key the file sets, and any other key takes the *target's* default (a PNDM file
    without ``timestep_spacing`` gives Euler "linspace" but DDIM "leading"). Keys the target does not take stay
    readable through :meth:`extra`, because diffusers keeps them on the config too and some code looks them up there.
    """

    def __init__(self, owner: str, config: Mapping[str, Any], defaults: Mapping[str, Any],
                 overrides: Mapping[str, Any] | None = None) -> None:
        self.owner = owner
        # diffusers lists keys that were never set in "_use_default_values"; from_config treats them as absent.
        unset = set(config.get("_use_default_values") or ())
        self._file = {k: v for k, v in config.items() if not k.startswith("_") and k not in unset}
        self._values = {k: self._file.get(k, v) for k, v in defaults.items()}
        for k, v in (overrides or {}).items():
            if k not in defaults:
                raise TypeError(f"{owner} takes no setting {k!r}")
            self._values[k] = v

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def extra(self, key: str) -> Any:
        """A key from the file that the target class does not take (``None`` when absent)."""
        return self._values.get(key, self._file.get(key))

    def require(self, key: str, *allowed: Any) -> Any:
        """The value of ``key``, or a ValueError naming it when it asks for a feature not implemented here."""
        value = self._values[key]
        if value not in allowed:
            raise ValueError(f"{self.owner}: {key}={value!r} is not supported here; use one of "
                             f"{', '.join(repr(a) for a in allowed)}")
        return value

    def prediction_type(self) -> PredictionType:
        # "sample" (x₀-prediction) exists in diffusers but no Stable Diffusion 2 checkpoint uses it.
        return self.require("prediction_type", *PREDICTION_TYPES)

    def spacing(self) -> TimestepSpacing:
        return self.require("timestep_spacing", *TIMESTEP_SPACINGS)


# --- the training noise schedule -------------------------------------------------------------------------------


def torch_linspace_f32(start: float, end: float, count: int) -> np.ndarray:
    """``torch.linspace(start, end, count, dtype=torch.float32)`` as torch's CPU kernel computes it, bit for bit.

    Torch fills the first half forward from ``start`` and the second half backward from ``end``, each value one
    float32 multiply-add that its x86-64 build fuses (a single rounding). ``np.linspace`` rounds differently in about
    a third of SD's 1000 betas; float64 arithmetic on the float32 inputs reproduces the fused operation exactly.
    """
    if count == 1:
        return np.array([start], dtype=F32)
    lo, hi = F32(start), F32(end)
    step = np.float64((hi - lo) / F32(count - 1))
    i = np.arange(count)
    first_half = i < count // 2
    k = np.where(first_half, i, count - 1 - i).astype(F32).astype(np.float64)
    return np.where(first_half, np.float64(lo) + step * k, np.float64(hi) - step * k).astype(F32)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021): betas that discretise ᾱ(t) = cos²((t+s)/(1+s)·π/2)
    with s = 0.008, each capped at ``max_beta`` to avoid a singular last step. Computed in Python floats."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=F32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Algorithm 1 of "Common Diffusion Noise Schedules and Sample Steps are Flawed" (Lin et al. 2023): shift and
    scale √ᾱ so that ᾱ_T = 0 (zero terminal SNR) while ᾱ_0 is kept, then recover the betas."""
    sqrt_ab = np.sqrt(_cumprod_f32(ONE - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    alphas_bar = sqrt_ab * sqrt_ab
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return ONE - alphas


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    # torch.cumprod on the CPU accumulates float32 in float64 and rounds each partial product back to float32;
    # np.cumprod in float32 would round every partial product and drift by ~1e-6 over 1000 steps.
    return np.cumprod(x.astype(np.float64)).astype(F32)


def train_alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """ᾱ_t = ∏ (1 − β_s) for s ≤ t over the training timesteps (float32), from the config's beta settings."""
    n = int(cfg["num_train_timesteps"])
    schedule = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = np.asarray(cfg["trained_betas"], dtype=F32)
    elif schedule == "linear":
        betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
    elif schedule == "scaled_linear":
        # Linear in √β, the schedule Stable Diffusion was trained with.
        sqrt_betas = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
        betas = sqrt_betas * sqrt_betas
    elif schedule == "squaredcos_cap_v2":
        betas = _cosine_betas(n)
    else:
        raise ValueError(f"{cfg.owner}: beta_schedule {schedule!r} is not supported; use one of linear, "
                         "scaled_linear, squaredcos_cap_v2")
    if cfg["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return _cumprod_f32(ONE - betas)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_t = √((1 − ᾱ_t) / ᾱ_t), the noise level of each training timestep in the variance-exploding view (float32)."""
    return np.sqrt((ONE - alphas_cumprod) / alphas_cumprod)


# --- inference timesteps -----------------------------------------------------------------------------------------


def spaced_timesteps(spacing: str, count: int, num_train_timesteps: int, steps_offset: int,
                     last: int | None = None) -> np.ndarray:
    """``count`` descending timesteps (float64, not yet rounded) in one of the spacings of table 2 of Lin et al. 2023.

    linspace: evenly from ``last - 1`` down to 0; leading: multiples of ``last // count`` from 0, shifted up by
    ``steps_offset``; trailing: evenly from ``last - 1`` down in strides of ``num_train_timesteps / count``.
    ``last`` (default ``num_train_timesteps``) is one past the largest usable training timestep.
    """
    last = num_train_timesteps if last is None else last
    if spacing == "linspace":
        return np.linspace(0, last - 1, count)[::-1].copy()
    if spacing == "leading":
        return (np.arange(count) * (last // count))[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return np.arange(last, 0, -num_train_timesteps / count).round() - 1
    raise ValueError(f"timestep_spacing {spacing!r} is not supported; use one of {', '.join(TIMESTEP_SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, count: int, rho: float = 7.0) -> np.ndarray:
    """The noise levels of Karras et al. 2022 (eq. 5): evenly spaced in σ^(1/ρ) from σ_max to σ_min (float64)."""
    ramp = np.linspace(0, 1, count)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timesteps of ``sigmas``: linear interpolation in log σ between the two neighbouring
    training sigmas (``log_sigmas``, float32, ascending), clamped to the table. Mixed float64/float32 like diffusers."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    above = log_sigma[None, :] - log_sigmas[:, None] >= 0
    # Index of the last training sigma not above σ, kept one short of the end so that ``high`` exists.
    low = np.cumsum(above, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return (1 - w) * low + w * high


def index_for_timestep(timesteps: np.ndarray, timestep: Timestep) -> int | None:
    """Position of ``timestep`` in the schedule, or None. Like diffusers, a repeated timestep resolves to its second
    occurrence, so that a run started mid-schedule (img2img) does not skip a sigma."""
    hits = np.flatnonzero(timesteps == np.asarray(timestep))
    if len(hits) == 0:
        return None
    return int(hits[1] if len(hits) > 1 else hits[0])
