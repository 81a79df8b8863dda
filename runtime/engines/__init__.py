"""Inference engines behind one small interface (:class:`Session`): onnxruntime on the CPU or CUDA
(:mod:`runtime.engines.ort`) and OpenVINO on the CPU (:mod:`runtime.engines.openvino`); which one runs is decided in
:mod:`runtime.engines.select`."""

from __future__ import annotations

from pathlib import Path

from runtime.engines.openvino import OvSession, compile_cache_dir, openvino_math_precision
from runtime.engines.ort import OrtSession
from runtime.engines.select import (
    DEVICES,
    Device,
    Engine,
    InputSpec,
    Session,
    available_engines,
    check_precision,
    choose,
    cuda_device_count,
    cuda_driver_problem,
    cuda_driver_version,
    cuda_usable,
    default_threads,
    onnxruntime_cuda_major,
    parse_threads,
)
from runtime.options import ENGINES, PRECISIONS, DeviceChoice, EngineChoice, PrecisionChoice

__all__ = [
    "DEVICES",
    "ENGINES",
    "PRECISIONS",
    "Device",
    "DeviceChoice",
    "Engine",
    "EngineChoice",
    "InputSpec",
    "OrtSession",
    "OvSession",
    "PrecisionChoice",
    "Session",
    "available_engines",
    "check_precision",
    "choose",
    "compile_cache_dir",
    "cuda_device_count",
    "cuda_driver_problem",
    "cuda_driver_version",
    "cuda_usable",
    "default_threads",
    "onnxruntime_cuda_major",
    "open_session",
    "openvino_math_precision",
    "parse_threads",
]


def open_session(path: Path, engine: Engine, device: Device, threads: int, precision: str,
                 cuda_graph: bool = False, compile_cache: Path | None = None, static_shapes: bool = False) -> Session:
    """Load one graph on the chosen engine with the math ``precision`` (see :data:`PRECISIONS`); ``cuda_graph``
    captures CUDA graphs per static shape (onnxruntime on CUDA only); ``compile_cache`` is a folder where OpenVINO
    keeps the compiled shapes of this graph for the next start; ``static_shapes`` makes OpenVINO compile per input
    shape rather than once."""
    if engine == "onnxruntime":
        return OrtSession(path, device, threads, cuda_graph=cuda_graph)
    hint = {"auto": None, "fp32": "f32", "bf16": "bf16"}[precision]
    return OvSession(path, threads, hint, cache_dir=compile_cache, static_shapes=static_shapes)


