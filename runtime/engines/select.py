"""Choosing an engine and a device, and the thread cap: explicit wins, then detected, then verified.

An explicit engine/device wins; ``auto`` picks CUDA when onnxruntime offers it and a GPU answers, else OpenVINO for
an OpenVINO bundle, else onnxruntime on the CPU. After a session exists the engine checks what it really got
(:mod:`runtime.engines.ort`): asking for CUDA and silently running on the CPU is an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from runtime.errors import ConfigError, EngineError
from runtime.options import ENGINES, PRECISIONS

Engine = Literal["onnxruntime", "openvino"]
#: "cpu", "cuda" (GPU 0) or "cuda:N" (GPU N, e.g. one worker per GPU).
Device = str
DEVICES = ("auto", "cpu", "cuda")

def default_threads() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset limits it), not the host's.

    The runtime reads no environment variable: ``T2I_THREADS`` is a setting of the application (backend.config).
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_threads(value: str | int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"threads {value!r} is not a number; use a whole number from 1 to 1024") from None
    if not 1 <= n <= 1024:
        raise ConfigError(f"threads {n} is out of range; use a whole number from 1 to 1024")
    return n


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the graph declares it: the dtype to feed and the shape (None or a name for dynamic axes)."""

    name: str
    dtype: type
    shape: tuple[int | str | None, ...]


class Session(Protocol):
    """One loaded graph. ``run`` takes numpy feeds by input name and returns the outputs in graph order."""

    inputs: dict[str, InputSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


def available_engines() -> dict[str, Any]:
    """What this installation offers, for `text2image info` and for ``auto`` selection."""
    found: dict[str, Any] = {}
    try:
        import onnxruntime as ort

        found["onnxruntime"] = {"version": ort.__version__, "providers": ort.get_available_providers()}
    except ImportError:
        pass
    try:
        import openvino as ov

        found["openvino"] = {"version": ov.get_version(), "devices": ov.Core().available_devices}
    except ImportError:
        pass
    return found


def cuda_device_count() -> int:
    """GPUs that onnxruntime's CUDA provider could use: 0 without the provider or without an answering driver."""
    try:
        import onnxruntime as ort
    except ImportError:
        return 0
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return 0
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        ok = lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0
        return count.value if ok else 0
    except OSError:
        return 0


def cuda_driver_version() -> tuple[int, int] | None:
    """The newest CUDA version the host's NVIDIA driver supports (major, minor), None without a driver."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value // 1000, version.value % 1000 // 10


def onnxruntime_cuda_major() -> tuple[str, int] | None:
    """The installed onnxruntime-gpu's version and the CUDA major version it was built for (its wheel names the
    CUDA runtime it needs), None without onnxruntime-gpu."""
    import re
    from importlib import metadata

    try:
        dist = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return None
    for requirement in dist.requires or []:
        found = re.match(r"nvidia-cuda-runtime(?:-cu(\d+))?\s*~=\s*(\d+)", requirement)
        if found:
            return dist.version, int(found[1] or found[2])
    return None


def cuda_driver_problem() -> str | None:
    """A plain sentence when the host's driver is too old for the installed onnxruntime-gpu, else None."""
    driver, built = cuda_driver_version(), onnxruntime_cuda_major()
    if driver is None or built is None or driver[0] >= built[1]:
        return None
    return (f"the NVIDIA driver supports CUDA {driver[0]}.{driver[1]} only, but onnxruntime-gpu {built[0]} needs CUDA "
            f"{built[1]}: update the host's NVIDIA driver, or install an onnxruntime-gpu built for CUDA "
            f"{driver[0]} (for CUDA 12: onnxruntime-gpu<1.27, what the CUDA image ships)")


def cuda_usable() -> bool:
    """True when onnxruntime has the CUDA provider *and* a GPU answers (the provider alone loads without one)."""
    return cuda_device_count() > 0


def _cuda_index(device: str) -> int | None:
    """The GPU index of 'cuda' / 'cuda:N', None for other devices; bad forms raise."""
    if device == "cuda":
        return 0
    if not device.startswith("cuda:"):
        return None
    try:
        index = int(device[5:])
    except ValueError:
        index = -1
    if index < 0:
        raise ConfigError(f"device '{device}' is not known; use auto, cpu, cuda or cuda:N (N = GPU index from 0)")
    return index


def choose(bundle_format: str, engine: str, device: str) -> tuple[Engine, Device, str]:
    """Resolve ``engine``/``device`` (each possibly ``auto``) for a bundle; return them with the reason."""
    if engine not in ENGINES:
        raise ConfigError(f"engine '{engine}' is not known; use one of {', '.join(ENGINES)}")
    gpu = _cuda_index(device)
    if device not in DEVICES and gpu is None:
        raise ConfigError(f"device '{device}' is not known; use one of {', '.join(DEVICES)} or cuda:N")
    have = available_engines()
    if engine == "onnxruntime" and bundle_format != "onnx":
        raise ConfigError(
            f"engine 'onnxruntime' needs an ONNX bundle (model.onnx files) but this bundle is {bundle_format}; "
            "use --engine openvino or auto, or export the model with --format onnx"
        )
    if gpu is not None:
        if engine == "openvino":
            raise ConfigError("device 'cuda' runs on the onnxruntime engine only; use --engine onnxruntime or auto")
        if bundle_format != "onnx":
            raise ConfigError("device 'cuda' needs an ONNX bundle; export the model with --format onnx")
        count = cuda_device_count()
        if count == 0:
            raise EngineError(
                f"device '{device}' was asked for but CUDA is not usable here: onnxruntime-gpu's CUDAExecutionProvider "
                "is missing or no NVIDIA GPU answers; use --device cpu or auto"
            )
        if gpu >= count:
            raise EngineError(f"device '{device}' asks for GPU {gpu} but only {count} GPU(s) answer (0 to {count - 1})")
        return "onnxruntime", device, f"asked for {device}; onnxruntime CUDA provider and {count} GPU(s) present"
    if engine == "auto":
        if device == "auto" and bundle_format == "onnx" and cuda_usable():
            return "onnxruntime", "cuda", "auto: onnxruntime offers CUDA and a GPU answers"
        if bundle_format == "openvino":
            engine, why = "openvino", "auto: OpenVINO bundle"
        else:
            engine, why = "onnxruntime", "auto: ONNX bundle, no usable CUDA"
    else:
        why = f"asked for {engine}"
    if engine not in have:
        pkg = "openvino" if engine == "openvino" else "onnxruntime"
        raise EngineError(f"engine '{engine}' is not installed; install {pkg} with: pip install 'text2image-sd2[cpu]'")
    return engine, "cpu", why  # type: ignore[return-value]


def check_precision(precision: str, engine: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not known; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and engine != "openvino":
        raise ConfigError("precision 'bf16' needs the openvino engine; onnxruntime runs the graph's own types")
    return precision
