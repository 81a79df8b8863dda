"""The numpy schedulers against diffusers 0.35.2, step by step over whole schedules.

Each step both sides get the same float32 sample (the numpy side's previous output) and the same random "model
output". Feeding each side its own trajectory also agrees to 1e-5 here, but over 50 steps of random outputs it
compounds the last-ulp differences between torch's and numpy's float32 log/exp into flaky failures.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zlib
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from runtime.schedulers import (  # noqa: E402  (after the importorskip guards)
    SCHEDULER_NAMES,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    default_scheduler_name,
    make_scheduler,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}
EPS32 = float(np.finfo(np.float32).eps)
SHAPE = (2, 4, 8, 8)
STEPS = (1, 2, 4, 20, 50)
PREDICTIONS = ("epsilon", "v_prediction")
SPACINGS = ("leading", "linspace", "trailing")

# stabilityai/stable-diffusion-2's scheduler_config.json, less the class-specific keys.
SD2: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "trained_betas": None,
}

# runwayml/stable-diffusion-v1-5's scheduler_config.json: another class, no timestep_spacing, no prediction_type.
SD15_PNDM: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def sd2(**changes: Any) -> dict[str, Any]:
    return {**SD2, **changes}


def step_tolerance(*inputs: np.ndarray) -> dict[str, float]:
    """``TOL`` for a step's result, its absolute part grown by 4 float32 ulps of the step's largest input.

    A step forms its result (a few units) from terms as large as its inputs: with ``rescale_betas_zero_snr``,
    σ_max ≈ 4096, so the first latents reach ~1e4, where one float32 ulp is ~1e-3. torch and numpy round those terms
    differently by an ulp or two depending on the CPU's vector paths (seen: 2 ulps on an AMD Zen 5, none on an
    Intel Xeon), so a fixed ``atol`` of 1e-5 is a statement about one CPU, not about the scheduler. At ordinary
    magnitudes (|x| ≲ 20) the added term is under 1e-5 and the tolerance stays what it was.
    """
    scale = max(float(np.max(np.abs(a))) for a in inputs)
    return {"rtol": TOL["rtol"], "atol": TOL["atol"] + 4 * EPS32 * scale}


def compare_run(ours: Any, ref: Any, steps: int) -> None:
    """Set both schedulers to ``steps`` steps and compare everything the denoising loop sees, step by step."""
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    ref_timesteps = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_timesteps.dtype
    np.testing.assert_allclose(ours.timesteps, ref_timesteps, **TOL)
    np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), **TOL)

    rng = np.random.default_rng(zlib.crc32(repr((type(ours).__name__, steps)).encode()))
    noise = rng.standard_normal(SHAPE, dtype=np.float32)
    latents = noise * np.float32(ours.init_noise_sigma)
    np.testing.assert_allclose(latents, (torch.from_numpy(noise) * ref.init_noise_sigma).numpy(), **TOL)
    for i, (t, ref_t) in enumerate(zip(ours.timesteps, ref.timesteps, strict=True)):
        model_in = ours.scale_model_input(latents, t)
        ref_in = ref.scale_model_input(torch.from_numpy(latents), ref_t)
        np.testing.assert_allclose(model_in, ref_in.numpy(), **TOL, err_msg=f"scale_model_input, step {i}")
        model_out = rng.standard_normal(SHAPE, dtype=np.float32)
        prev = ours.step(model_out, t, latents)
        ref_prev = ref.step(torch.from_numpy(model_out), ref_t, torch.from_numpy(latents)).prev_sample
        assert prev.dtype == np.float32
        np.testing.assert_allclose(prev, ref_prev.numpy(), **step_tolerance(latents, model_out),
                                   err_msg=f"step {i} of {steps}")
        latents = prev


# --- Euler ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_euler_matches_diffusers(prediction: str, spacing: str, steps: int) -> None:
    cfg = sd2(_class_name="EulerDiscreteScheduler", prediction_type=prediction, timestep_spacing=spacing)
    compare_run(EulerDiscreteScheduler(cfg), diffusers.EulerDiscreteScheduler.from_config(cfg), steps)


@pytest.mark.parametrize("steps", (1, 4))
def test_euler_sd_turbo(steps: int) -> None:
    # stabilityai/sd-turbo: Euler, trailing spacing, epsilon; run with 1-4 steps.
    cfg = sd2(_class_name="EulerDiscreteScheduler", timestep_spacing="trailing", prediction_type="epsilon")
    ours = make_scheduler(default_scheduler_name(cfg), cfg)
    assert isinstance(ours, EulerDiscreteScheduler)
    compare_run(ours, diffusers.EulerDiscreteScheduler.from_config(cfg), steps)


@pytest.mark.parametrize("changes", [
    {"use_karras_sigmas": True, "timestep_spacing": "leading"},
    {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
    {"final_sigmas_type": "sigma_min"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
    {"beta_schedule": "squaredcos_cap_v2"},
], ids=["karras", "karras-pinned", "sigma-min", "zero-snr", "linear", "cosine"])
@pytest.mark.parametrize("steps", (4, 25))
def test_euler_variants(changes: dict[str, Any], steps: int) -> None:
    cfg = sd2(_class_name="EulerDiscreteScheduler", **changes)
    compare_run(EulerDiscreteScheduler(cfg), diffusers.EulerDiscreteScheduler.from_config(cfg), steps)


class PerturbedSigmaEuler(EulerDiscreteScheduler):
    """A defect the comparison must catch: one σ of the schedule off by 1e-4 (relative)."""

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        self._sigmas = self._sigmas.copy()
        self._sigmas[1] *= np.float32(1 + 1e-4)


ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}


@pytest.mark.parametrize("changes", [{}, ZERO_SNR], ids=["sd2", "zero-snr"])
@pytest.mark.parametrize("steps", (4, 25))
def test_comparison_catches_a_perturbed_sigma(changes: dict[str, Any], steps: int) -> None:
    # The tolerance grows with the inputs' magnitude; it must stay far below what a real defect costs.
    cfg = sd2(_class_name="EulerDiscreteScheduler", **changes)
    with pytest.raises(AssertionError, match=r"step \d+"):
        compare_run(PerturbedSigmaEuler(cfg), diffusers.EulerDiscreteScheduler.from_config(cfg), steps)


@pytest.mark.parametrize("cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler, DDIMScheduler],
                         ids=lambda c: c.__name__)
@pytest.mark.parametrize("changes", [{"prediction_type": "v_prediction"}, ZERO_SNR], ids=["v", "zero-snr"])
@pytest.mark.filterwarnings("ignore:divide by zero")  # ε read at ᾱ_T = 0 (zero SNR) is the defect itself
def test_comparison_catches_the_wrong_prediction_branch(cls: Any, changes: dict[str, Any]) -> None:
    # Ours computes x̂₀ as if the model predicted ε while the reference reads v: every step must be caught.
    cfg = sd2(_class_name=cls.__name__, **changes)
    ref = getattr(diffusers, cls.__name__).from_config(cfg)
    with pytest.raises(AssertionError, match=r"step 0 of 4"):
        compare_run(cls({**cfg, "prediction_type": "epsilon"}), ref, 4)


# --- DPM-Solver++ 2M --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("karras", (False, True), ids=("plain", "karras"))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpm_matches_diffusers(prediction: str, spacing: str, karras: bool, steps: int) -> None:
    cfg = sd2(_class_name="DPMSolverMultistepScheduler", prediction_type=prediction, timestep_spacing=spacing)
    ours = make_scheduler("dpm++2m-karras" if karras else "dpm++2m", cfg)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(cfg, use_karras_sigmas=karras)
    compare_run(ours, ref, steps)


@pytest.mark.parametrize("changes", [
    {"solver_type": "heun"},
    {"final_sigmas_type": "sigma_min"},
    {"euler_at_final": True},
    {"lower_order_final": False},
    {"solver_order": 1},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1},
], ids=["heun", "sigma-min", "euler-final", "no-lower-final", "order-1", "zero-snr", "cosine", "clipped"])
@pytest.mark.parametrize("steps", (4, 25))
def test_dpm_variants(changes: dict[str, Any], steps: int) -> None:
    cfg = sd2(_class_name="DPMSolverMultistepScheduler", **changes)
    compare_run(DPMSolverMultistepScheduler(cfg), diffusers.DPMSolverMultistepScheduler.from_config(cfg), steps)


def test_dpm_karras_reads_sigma_range_left_by_another_class() -> None:
    # An Euler config's sigma_min/sigma_max are no DPM arguments, yet diffusers' DPM Karras schedule reads them.
    cfg = sd2(_class_name="EulerDiscreteScheduler", sigma_min=0.1, sigma_max=10.0)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.EulerDiscreteScheduler.from_config(cfg).config, use_karras_sigmas=True)
    compare_run(make_scheduler("dpm++2m-karras", cfg), ref, 10)


# --- DDIM -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ddim_matches_diffusers(prediction: str, spacing: str, steps: int) -> None:
    cfg = sd2(_class_name="DDIMScheduler", prediction_type=prediction, timestep_spacing=spacing)
    compare_run(DDIMScheduler(cfg), diffusers.DDIMScheduler.from_config(cfg), steps)


@pytest.mark.parametrize("changes", [
    {"set_alpha_to_one": True, "clip_sample": True},
    {"clip_sample": True, "clip_sample_range": 2.0, "prediction_type": "v_prediction"},
    {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2"},
], ids=["alpha-one-clip", "clip-range", "zero-snr", "cosine"])
@pytest.mark.parametrize("steps", (4, 25))
def test_ddim_variants(changes: dict[str, Any], steps: int) -> None:
    cfg = sd2(_class_name="DDIMScheduler", **changes)
    compare_run(DDIMScheduler(cfg), diffusers.DDIMScheduler.from_config(cfg), steps)


# --- make_scheduler / default_scheduler_name --------------------------------------------------------------------

REFERENCE = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "dpm++2m": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": False}),
    "dpm++2m-karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "ddim": (diffusers.DDIMScheduler, {}),
}


@pytest.mark.parametrize("source", ("file", "loaded"))
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_make_scheduler_from_pndm_config(name: str, source: str) -> None:
    # What a diffusers pipeline does with an SD 1.5 bundle: load the PNDM config, then Target.from_config(its config).
    # Missing keys take the target's defaults (Euler/DPM: linspace; DDIM: leading and clip_sample=True). A loaded
    # config holds every PNDM key, with the unset ones listed under "_use_default_values"; those must not count.
    pndm = diffusers.PNDMScheduler.from_config(SD15_PNDM)
    cls, kwargs = REFERENCE[name]
    config = SD15_PNDM if source == "file" else dict(pndm.config)
    compare_run(make_scheduler(name, config), cls.from_config(pndm.config, **kwargs), 20)


def test_dpm_names_override_the_file() -> None:
    cfg = sd2(_class_name="DPMSolverMultistepScheduler", use_karras_sigmas=True, solver_order=3)
    compare_run(make_scheduler("dpm++2m", cfg), diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, use_karras_sigmas=False, solver_order=2), 20)


@pytest.mark.parametrize(("config", "name"), [
    ({"_class_name": "EulerDiscreteScheduler"}, "euler"),
    ({"_class_name": "DPMSolverMultistepScheduler"}, "dpm++2m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}, "dpm++2m-karras"),
    ({"_class_name": "DDIMScheduler"}, "ddim"),
    (SD15_PNDM, "dpm++2m"),
    ({}, "dpm++2m"),
])
def test_default_scheduler_name(config: dict[str, Any], name: str) -> None:
    assert default_scheduler_name(config) == name


def test_unknown_name() -> None:
    message = "scheduler 'foo' is not known; use one of euler, dpm++2m, dpm++2m-karras, ddim"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        make_scheduler("foo", SD2)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_unsupported_settings_raise(name: str) -> None:
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        make_scheduler(name, sd2(prediction_type="sample"))
    with pytest.raises(ValueError, match="timestep_spacing='sometimes' is not supported"):
        make_scheduler(name, sd2(timestep_spacing="sometimes"))
    if name != "euler":
        with pytest.raises(ValueError, match="thresholding=True"):
            make_scheduler(name, sd2(thresholding=True))


def test_euler_rejects_an_integer_index() -> None:
    s = make_scheduler("euler", SD2)
    s.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="not an integer index"):
        s.step(x, 0, x)


def test_runtime_imports_no_torch() -> None:
    code = "import sys, runtime.schedulers; sys.exit('torch' in sys.modules or 'diffusers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
