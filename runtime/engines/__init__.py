"""Inference engines behind one small interface (:class:`Session`, :mod:`runtime.engines.base`): onnxruntime on the
CPU or CUDA (:mod:`runtime.engines.ort`) and OpenVINO on the CPU (:mod:`runtime.engines.openvino`). Which one runs
is decided in :mod:`runtime.engines.choose`, with the host's CUDA probed in :mod:`runtime.engines.cuda`."""

from __future__ import annotations

from pathlib import Path

from runtime.engines.base import InputSpec, Session
from runtime.engines.choose import available_engines, check_precision, choose, default_threads, parse_threads
from runtime.engines.cuda import (
    cuda_device_count,
    cuda_driver_problem,
    cuda_driver_version,
    cuda_usable,
    onnxruntime_cuda_major,
)
from runtime.engines.openvino import OvSession, compile_cache_dir, openvino_math_precision
from runtime.engines.ort import OrtSession
from runtime.options import ENGINES, PRECISIONS, DeviceChoice, Engine, EngineChoice, PrecisionChoice

__all__ = [
    "ENGINES",
    "PRECISIONS",
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


def open_session(path: Path, engine: Engine, device: DeviceChoice, threads: int, precision: PrecisionChoice,
                 cuda_graph: bool = False, compile_cache: Path | None = None, static_shapes: bool = False) -> Session:
    """Load one graph on the chosen engine with the math ``precision`` (see :data:`PRECISIONS`); ``cuda_graph``
    captures CUDA graphs per static shape (onnxruntime on CUDA only); ``compile_cache`` is a folder where OpenVINO
    keeps the compiled shapes of this graph for the next start; ``static_shapes`` makes OpenVINO compile per input
    shape rather than once."""
    if engine == "onnxruntime":
        return OrtSession(path, device, threads, cuda_graph=cuda_graph)
    return OvSession(path, threads, precision, cache_dir=compile_cache, static_shapes=static_shapes)
