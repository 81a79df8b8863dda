"""Choosing an engine and a device, and the thread cap: explicit wins, then detected, then verified.

An explicit engine/device wins; ``auto`` picks CUDA when onnxruntime offers it and a GPU answers, else OpenVINO for
an OpenVINO bundle, else onnxruntime on the CPU. After a session exists the engine checks what it really got
(:mod:`runtime.engines.ort`): asking for CUDA and silently running on the CPU is an error.
"""

from __future__ import annotations

import os
from typing import Any, cast

from runtime.engines.cuda import cuda_device_count, cuda_index, cuda_usable
from runtime.errors import ConfigError, EngineError
from runtime.options import DEVICES, ENGINES, PRECISIONS, DeviceChoice, Engine, PrecisionChoice


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


def choose(bundle_format: str, engine: str, device: str) -> tuple[Engine, DeviceChoice, str]:
    """Resolve ``engine``/``device`` (each possibly ``auto``) for a bundle; return them with the reason."""
    if engine not in ENGINES:
        raise ConfigError(f"engine '{engine}' is not known; use one of {', '.join(ENGINES)}")
    gpu = cuda_index(device)
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


def check_precision(precision: str, engine: str) -> PrecisionChoice:
    """``precision`` if it is known and the ``engine`` computes in it, else :class:`ConfigError`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision '{precision}' is not known; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and engine != "openvino":
        raise ConfigError("precision 'bf16' needs the openvino engine; onnxruntime runs the graph's own types")
    return cast(PrecisionChoice, precision)
