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
from runtime.errors import ConfigError
from runtime.options import ENGINES, PRECISIONS, DeviceChoice, Engine, EngineChoice, LoadOptions, PrecisionChoice

__all__ = [
    "ENGINES",
    "PRECISIONS",
    "DeviceChoice",
    "Engine",
    "EngineChoice",
    "InputSpec",
    "LoadOptions",
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


def open_session(path: Path, options: LoadOptions, cache: Path | None = None) -> Session:
    """Load one graph as resolved ``options`` say (a chosen engine and device, a thread count: see
    :meth:`runtime.Pipeline.load`). With ``compile_cache`` on, OpenVINO keeps the graph's compiled shapes in a
    folder of its own under ``cache`` for the next start; onnxruntime keeps nothing."""
    if options.engine == "onnxruntime":
        return OrtSession(path, options.device, options.threads, cuda_graph=options.cuda_graph)
    if options.engine != "openvino":
        raise ConfigError(f"engine '{options.engine}' is not a chosen engine; use onnxruntime or openvino")
    keep = compile_cache_dir(cache, path) if options.compile_cache and cache is not None else None
    return OvSession(path, options.threads, options.precision, cache_dir=keep, static_shapes=options.static_shapes)
