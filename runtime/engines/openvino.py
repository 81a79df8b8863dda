"""OpenVINO sessions on the CPU: static shapes compiled per call shape, the thread cap and the precision hint."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import InputSpec
from runtime.engines.mapped import releasing, resident_bytes
from runtime.engines.output_conv import TAIL_INPUT, split_output_conv
from runtime.engines.timestep import PROJECTED, split_timestep
from runtime.errors import BundleError, ConfigError, EngineError
from runtime.options import PrecisionChoice, StaticChoice

log = logging.getLogger(__name__)

#: OpenVINO's INFERENCE_PRECISION_HINT for each of our precision choices (auto: none, the plugin's own choice).
PRECISION_HINTS: dict[str, str | None] = {"auto": None, "fp32": "f32", "bf16": "bf16"}


class OvSession:
    """An OpenVINO model on the CPU with the thread cap and the precision hint applied.

    By default the graph is compiled once, with the dimensions the bundle leaves open (batch, height, width) still
    open: one compiled copy of the weights serves every image size and batch. Measured on a 2-core AVX2 EPYC with
    OpenVINO 2026.4 this ran the full-size 512² UNet step as fast as a compile for that exact shape (0.98x at batch
    1, 1.00x at 2), and a second size cost 8 MB where a second static compile costs a second copy of the weights
    (+3.6 GB in f32). ``static_shapes`` compiles for the exact input shapes of each call instead and keeps the last
    ``keep`` of them, for CPUs where that is faster (see ``text2image bench``); ``auto`` does so where the CPU has
    AMX (:func:`static_by_default`). Once a new shape has run, the
    weights file's mapped pages are given back (:mod:`runtime.engines.mapped`): the compiled model holds its own
    copy.
    """

    def __init__(self, path: Path, threads: int, precision: PrecisionChoice, keep: int = 2,
                 cache_dir: Path | None = None, static_shapes: StaticChoice | bool = "auto") -> None:
        import openvino as ov

        self._config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        hint = PRECISION_HINTS[precision]
        if hint:
            self._config["INFERENCE_PRECISION_HINT"] = hint
        if cache_dir is not None:
            # OpenVINO keys each blob by the graph, the shapes and this config as well; the folder (see
            # compile_cache_dir) also changes with the bundle's files and the OpenVINO version.
            cache_dir.mkdir(parents=True, exist_ok=True)
            self._config["CACHE_DIR"] = str(cache_dir)
        self._core = ov.Core()
        self._path = path
        self._weights = path.with_suffix(".bin")
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the parser's message
            raise BundleError(
                f"OpenVINO could not load {path}: {exc}. The file may be truncated or corrupt; re-export it"
            ) from None
        self.inputs = {}
        for port in self._model.inputs:
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            name = port.get_any_name()
            self.inputs[name] = InputSpec(name, port.get_element_type().to_dtype(), shape)
        self._projection: Any = None
        self._tail: Any = None
        if openvino_math_precision(precision) == "bf16":
            split = split_timestep(self._model)
            if split is not None:
                # The timestep's sinusoids in f32 (bf16 rounds 999 to 1000): see runtime.engines.timestep.
                self._model, self._keeps_timestep = split.unet, split.keeps_timestep
                config = {**self._config, "INFERENCE_PRECISION_HINT": "f32"}
                config.pop("CACHE_DIR", None)
                self._projection = self._core.compile_model(split.projection, "CPU", config).create_infer_request()
                self._projection_inputs = [p.get_any_name() for p in split.projection.inputs]
                log.info("%s: the timestep's projection runs in f32 beside the bf16 graph", path.parent.name)
                tail = split_output_conv(self._model)
                if tail is not None:
                    # The prediction's last convolution in f32, unrounded: see runtime.engines.output_conv.
                    self._model = tail.main
                    self._tail = self._core.compile_model(tail.tail, "CPU", config).create_infer_request()
                    log.info("%s: its last convolution runs in f32 beside the bf16 graph", path.parent.name)
        self._n_out = len(self._model.outputs)
        self._keep = keep
        self._static = static_shapes_on(static_shapes)
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self._seen: set[tuple] = set()

    def _request_for(self, shapes: tuple, feeds: dict[str, np.ndarray]) -> Any:
        """The infer request for these input shapes, compiled now if there is none."""
        key = shapes if self._static else ()
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        t0 = time.perf_counter()
        model = self._model
        if self._static:
            model = model.clone()
            model.reshape({name: list(arr.shape) for name, arr in feeds.items()})
        try:
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        except Exception as exc:
            what = f"shapes {dict(shapes)}" if self._static else "all shapes"
            raise EngineError(f"OpenVINO could not compile {self._path} for {what}: {exc}") from None
        log.info("compiled %s for %s in %.1f s", self._path.parent.name,
                 dict(shapes) if self._static else "all shapes", time.perf_counter() - t0)
        self._compiled[key] = request
        while len(self._compiled) > self._keep:
            self._compiled.popitem(last=False)
        return request

    def _project_timestep(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The feeds for the graph without its timestep projection: the projection run here, in f32."""
        self._projection.infer({name: feeds[name] for name in self._projection_inputs})
        out = {name: arr for name, arr in feeds.items() if name != "timestep" or self._keeps_timestep}
        out[PROJECTED] = np.array(self._projection.get_output_tensor(0).data, copy=True)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._projection is not None and "timestep" in feeds:
            feeds = self._project_timestep(feeds)
        shapes = tuple((name, feeds[name].shape) for name in sorted(feeds))
        fresh = shapes not in self._seen
        # A compile and the first run of a shape (which may repack weights lazily) read the weights file: its pages
        # are given back meanwhile and after, since the compiled model holds its own copy.
        with releasing(self._weights) if fresh else contextlib.nullcontext():
            request = self._request_for(shapes, feeds)
            try:
                request.infer(feeds)
            except Exception as exc:  # OpenVINO's RuntimeError subclasses; the cause stays chained for the log
                dims = {name: list(arr.shape) for name, arr in feeds.items()}
                raise EngineError(f"OpenVINO failed to run {self._path.parent.name} on inputs {dims}: {exc}") from exc
        if fresh:
            self._seen.add(shapes)
        if fresh and log.isEnabledFor(logging.DEBUG):  # reading smaps costs milliseconds in a large process
            log.debug("%s: %d MB of the weights file resident after its first run at %s", self._path.parent.name,
                      resident_bytes(self._weights) >> 20, dict(shapes))
        if self._tail is not None:
            self._tail.infer({TAIL_INPUT: request.get_output_tensor(0).data})
            request = self._tail
        # Copy: the request reuses its output buffers on the next call.
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(self._n_out)]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first processor's feature flags as Linux lists them (empty where the file is missing)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def static_by_default(flags: frozenset[str] | None = None) -> bool:
    """Whether ``static_shapes=auto`` compiles per shape on this CPU: where it has AMX (``amx_tile``), measured 8-10 %
    faster per UNet step on a 2-core Xeon; elsewhere the shape-free compile measured as fast (2-core AVX2 EPYC) and
    holds one copy of the weights for every size."""
    return has_amx(flags)


def has_amx(flags: frozenset[str] | None = None) -> bool:
    """Whether a CPU with these flags (this machine's by default) has AMX: where OpenVINO runs bf16 on tiles."""
    return "amx_tile" in (_host_flags() if flags is None else flags)


@functools.cache
def _host_flags() -> frozenset[str]:
    """This machine's flags, read once: each graph a pipeline loads, and its log line, ask."""
    return cpu_flags()


def static_shapes_on(choice: StaticChoice | bool) -> bool:
    """The ``static_shapes`` option as a decision: true/false as given, auto by :func:`static_by_default`."""
    if isinstance(choice, bool):
        return choice
    if choice not in ("auto", "true", "false"):
        raise ConfigError(f"static_shapes '{choice}' is not known; use auto, true or false")
    return static_by_default() if choice == "auto" else choice == "true"


def compile_cache_dir(root: Path, graph: Path) -> Path:
    """The folder under ``root`` for one graph's compiled blobs: named by the OpenVINO version and a digest of the
    graph's files (path, size, modification time), so a changed bundle or a new OpenVINO never reads a stale blob."""
    import hashlib

    import openvino as ov

    key = hashlib.sha256()
    for part in (graph, graph.with_suffix(".bin")):
        if part.is_file():
            info = part.stat()
            key.update(f"{part.resolve()}|{info.st_size}|{info.st_mtime_ns}\n".encode())
    version = ov.__version__.split("-")[0]
    return root / f"openvino-{version}" / f"{graph.parent.name}-{key.hexdigest()[:16]}"


_OV_PRECISION: dict[str | None, str] = {}


def openvino_math_precision(precision: str) -> str:
    """What OpenVINO's CPU plugin computes in for our ``precision`` choice on this CPU: "bf16" or "f32".

    OpenVINO decides by the hardware: ``auto`` becomes bf16 where the CPU has native bf16 (AMX or AVX512-BF16) and f32
    elsewhere, and a bf16 hint on a CPU without it quietly runs f32. Read from a compiled one-op model, because only
    the compiled model tells what the plugin really chose.
    """
    hint = PRECISION_HINTS[precision]
    if hint not in _OV_PRECISION:
        import openvino as ov
        from openvino import opset13 as ops

        x = ops.parameter([1, 16], np.float32)
        probe = ov.Model([ops.matmul(x, ops.constant(np.ones((16, 16), np.float32)), False, False)], [x])
        compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
        _OV_PRECISION[hint] = str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
    return _OV_PRECISION[hint]


