"""Inference engines behind one small interface: onnxruntime (CPU or CUDA) and OpenVINO (CPU).

Choice is explicit, then detected, then verified: an explicit engine/device wins; ``auto`` picks CUDA when
onnxruntime offers it and a GPU answers, else OpenVINO for an OpenVINO bundle, else onnxruntime on the CPU. After a
session exists we check what we really got: asking for CUDA and silently running on the CPU is an error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from runtime.errors import T2IError

log = logging.getLogger(__name__)

Engine = Literal["onnxruntime", "openvino"]
#: "cpu", "cuda" (GPU 0) or "cuda:N" (GPU N, e.g. one worker per GPU).
Device = str
ENGINES = ("auto", "onnxruntime", "openvino")
DEVICES = ("auto", "cpu", "cuda")

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def default_threads() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset limits it), not the host's."""
    env = os.environ.get("T2I_THREADS")
    if env:
        return parse_threads(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_threads(value: str | int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise T2IError(f"threads {value!r} is not a number; use a whole number from 1 to 1024") from None
    if not 1 <= n <= 1024:
        raise T2IError(f"threads {n} is out of range; use a whole number from 1 to 1024")
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
        raise T2IError(f"device '{device}' is not known; use auto, cpu, cuda or cuda:N (N = GPU index from 0)")
    return index


def choose(bundle_format: str, engine: str, device: str) -> tuple[Engine, Device, str]:
    """Resolve ``engine``/``device`` (each possibly ``auto``) for a bundle; return them with the reason."""
    if engine not in ENGINES:
        raise T2IError(f"engine '{engine}' is not known; use one of {', '.join(ENGINES)}")
    gpu = _cuda_index(device)
    if device not in DEVICES and gpu is None:
        raise T2IError(f"device '{device}' is not known; use one of {', '.join(DEVICES)} or cuda:N")
    have = available_engines()
    if engine == "onnxruntime" and bundle_format != "onnx":
        raise T2IError(
            f"engine 'onnxruntime' needs an ONNX bundle (model.onnx files) but this bundle is {bundle_format}; "
            "use --engine openvino or auto, or export the model with --format onnx"
        )
    if gpu is not None:
        if engine == "openvino":
            raise T2IError("device 'cuda' runs on the onnxruntime engine only; use --engine onnxruntime or auto")
        if bundle_format != "onnx":
            raise T2IError("device 'cuda' needs an ONNX bundle; export the model with --format onnx")
        count = cuda_device_count()
        if count == 0:
            raise T2IError(
                f"device '{device}' was asked for but CUDA is not usable here: onnxruntime-gpu's CUDAExecutionProvider "
                "is missing or no NVIDIA GPU answers; use --device cpu or auto"
            )
        if gpu >= count:
            raise T2IError(f"device '{device}' asks for GPU {gpu} but only {count} GPU(s) answer (0 to {count - 1})")
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
        raise T2IError(f"engine '{engine}' is not installed; install {pkg} with: pip install 'text2image-sd2[cpu]'")
    return engine, "cpu", why  # type: ignore[return-value]


class OrtSession:
    """An onnxruntime InferenceSession with the thread cap and the provider check applied.

    On CUDA the graph runs through IOBinding: per input shape, device buffers for the inputs and outputs are
    allocated once and reused, so a denoising step costs one host→device copy of the new inputs and one copy of
    the result back. With ``cuda_graph`` the CUDA provider also captures each shape's kernel launches into a CUDA
    graph on first use and replays it afterwards (static shapes; up to :attr:`MAX_GRAPHS` shapes).
    ``io_binding`` forces the bound path on or off (it also runs on the CPU, which the tests use).
    """

    MAX_GRAPHS = 4

    def __init__(self, path: Path, device: Device, threads: int, io_binding: bool | None = None,
                 cuda_graph: bool = False) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # One pool of `threads` workers inside each op; ops run one after another (the graph is a chain anyway).
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CPUExecutionProvider"]
        gpu = _cuda_index(device)
        if cuda_graph and gpu is None:
            raise T2IError(f"CUDA graphs need a CUDA device; device '{device}' is not one")
        if gpu is not None:
            options = {"device_id": gpu, "arena_extend_strategy": "kSameAsRequested"}
            if cuda_graph:
                options["enable_cuda_graph"] = "1"
            providers = [("CUDAExecutionProvider", options), *providers]
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated types for unreadable graphs
            missing = re.search(r"Failed to find kernel for ([\w.]+)", str(exc))
            if missing and gpu is None:
                # A graph fused for onnxruntime's CUDA provider (our --fusions cuda, onnxruntime's own
                # optimize_pipeline, bundles such as onnxruntime/sd-turbo): NhwcConv, GroupNorm … have no CPU kernel.
                raise T2IError(
                    f"{path} uses {missing[1]}, a fused op that onnxruntime runs on CUDA only: this bundle was "
                    "optimized for GPUs; load it with --device cuda, or use a bundle made for the CPU (plain ONNX "
                    "or OpenVINO)"
                ) from None
            raise T2IError(
                f"onnxruntime could not load {path}: {exc}. The file may be truncated or corrupt; re-export it"
            ) from None
        got = self._session.get_providers()
        if gpu is not None and got[0] != "CUDAExecutionProvider":
            raise T2IError(f"asked for CUDA for {path.parent.name} but onnxruntime gave {got}")
        self.inputs = {
            i.name: InputSpec(i.name, _ORT_DTYPES.get(i.type, np.float32), tuple(i.shape))
            for i in self._session.get_inputs()
        }
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._name = path.parent.name
        self._where = ("cuda", gpu) if gpu is not None else ("cpu", 0)
        self._io_binding = gpu is not None if io_binding is None else io_binding
        self._cuda_graph = cuda_graph
        self._bound: dict[tuple, _Bound] = {}
        self._graphs_used = 0
        self._lock = threading.Lock()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if not self._io_binding:
            return list(self._session.run(self._outputs, feeds))
        # np.require keeps 0-d inputs (a scalar timestep) 0-d; ascontiguousarray would make them 1-d.
        typed = {name: np.require(arr, self.inputs[name].dtype, "C") for name, arr in feeds.items()}
        key = tuple((name, typed[name].shape) for name in sorted(typed))
        with self._lock:
            bound = self._bound.get(key)
            if bound is None:
                bound, first = self._bind(typed)
                self._bound[key] = bound
                return first
            for name, arr in typed.items():
                bound.inputs[name].update_inplace(arr)
            try:
                self._session.run_with_iobinding(bound.binding, bound.run_options)
            except Exception as exc:
                if bound.graph_id < 0:
                    raise
                # A graph that cannot be captured or replayed must not take the service down: run this shape
                # without a graph from now on (same buffers, so nothing else changes).
                log.warning("%s: CUDA graph %d failed (%s); running this shape without a graph", self._name,
                            bound.graph_id, exc)
                bound.run_options = _graph_options(-1)
                bound.graph_id = -1
                self._session.run_with_iobinding(bound.binding, bound.run_options)
            bound.binding.synchronize_outputs()
            return [np.array(value.numpy(), copy=True) for value in bound.outputs]

    def _bind(self, feeds: dict[str, np.ndarray]) -> tuple[_Bound, list[np.ndarray]]:
        """First call with these shapes: device buffers for the inputs, one run to learn the outputs' shapes, then
        device buffers for the outputs (fixed addresses, as a CUDA graph needs). Returns the binding and the
        outputs of that first run."""
        import onnxruntime as ort

        kind, index = self._where
        inputs = {name: ort.OrtValue.ortvalue_from_numpy(arr, kind, index) for name, arr in feeds.items()}
        probe = self._session.io_binding()
        for name, value in inputs.items():
            probe.bind_ortvalue_input(name, value)
        for name in self._outputs:
            probe.bind_output(name, kind, index)
        # No capture for the probe: its outputs are not at fixed addresses yet.
        self._session.run_with_iobinding(probe, _graph_options(-1 if self._cuda_graph else None))
        probe.synchronize_outputs()
        first = [np.array(value.numpy(), copy=True) for value in probe.get_outputs()]
        binding = self._session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        outputs = []
        for name, arr in zip(self._outputs, first, strict=True):
            value = ort.OrtValue.ortvalue_from_shape_and_type(arr.shape, arr.dtype, kind, index)
            binding.bind_ortvalue_output(name, value)
            outputs.append(value)
        graph_id = -1
        if self._cuda_graph and self._graphs_used < self.MAX_GRAPHS:
            graph_id = self._graphs_used  # ids are never reused, not even after a graph failed
            self._graphs_used += 1
        if self._cuda_graph:
            log.info("%s: shapes %s get CUDA graph %s", self._name, {n: a.shape for n, a in feeds.items()},
                     graph_id if graph_id >= 0 else "none (graph limit reached)")
        return _Bound(binding, inputs, outputs, _graph_options(graph_id if self._cuda_graph else None), graph_id), first


def _graph_options(graph_id: int | None) -> Any:
    """onnxruntime RunOptions naming the CUDA graph of a run: an id to capture/replay, -1 for none (on a session
    with CUDA graphs enabled), None for a session without them."""
    import onnxruntime as ort

    options = ort.RunOptions()
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


@dataclass
class _Bound:
    """One input shape's IOBinding: its device buffers stay put, so a CUDA graph can replay over them."""

    binding: Any
    inputs: dict[str, Any]
    outputs: list[Any]
    run_options: Any
    graph_id: int


class OvSession:
    """An OpenVINO model on the CPU with the thread cap and the precision hint applied.

    The graph is compiled for the exact input shapes of each call (static shapes): OpenVINO's CPU plugin runs
    static graphs much faster than dynamic ones, and a size change costs one recompile. The last
    ``keep`` compiled shapes are kept.
    """

    def __init__(self, path: Path, threads: int, precision_hint: str | None, keep: int = 2) -> None:
        import openvino as ov

        self._config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision_hint:
            self._config["INFERENCE_PRECISION_HINT"] = precision_hint
        self._core = ov.Core()
        self._path = path
        try:
            self._model = self._core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the parser's message
            raise T2IError(
                f"OpenVINO could not load {path}: {exc}. The file may be truncated or corrupt; re-export it"
            ) from None
        self.inputs = {}
        for port in self._model.inputs:
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            name = port.get_any_name()
            self.inputs[name] = InputSpec(name, port.get_element_type().to_dtype(), shape)
        self._n_out = len(self._model.outputs)
        self._keep = keep
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()

    def _request_for(self, feeds: dict[str, np.ndarray]) -> Any:
        key = tuple((name, feeds[name].shape) for name in sorted(feeds))
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        t0 = time.perf_counter()
        model = self._model.clone()
        model.reshape({name: list(arr.shape) for name, arr in feeds.items()})
        try:
            request = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        except Exception as exc:
            raise T2IError(f"OpenVINO could not compile {self._path} for shapes {dict(key)}: {exc}") from None
        log.info("compiled %s for %s in %.1f s", self._path.parent.name, dict(key), time.perf_counter() - t0)
        self._compiled[key] = request
        while len(self._compiled) > self._keep:
            self._compiled.popitem(last=False)
        return request

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = self._request_for(feeds)
        request.infer(feeds)
        # Copy: the request reuses its output buffers on the next call.
        return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(self._n_out)]


#: Math precision choices: auto leaves each engine its own default (OpenVINO picks bf16 on CPUs with AVX512-BF16 or
#: AMX, onnxruntime runs the graph's own types); fp32 forces full precision, e.g. to match the reference exactly.
PRECISIONS = ("auto", "fp32", "bf16")


def open_session(path: Path, engine: Engine, device: Device, threads: int, precision: str,
                 cuda_graph: bool = False) -> Session:
    """Load one graph on the chosen engine with the math ``precision`` (see :data:`PRECISIONS`); ``cuda_graph``
    captures CUDA graphs per static shape (onnxruntime on CUDA only)."""
    if engine == "onnxruntime":
        return OrtSession(path, device, threads, cuda_graph=cuda_graph)
    hint = {"auto": None, "fp32": "f32", "bf16": "bf16"}[precision]
    return OvSession(path, threads, hint)


_OV_PRECISION: dict[str | None, str] = {}


def openvino_math_precision(precision: str) -> str:
    """What OpenVINO's CPU plugin computes in for our ``precision`` choice on this CPU: "bf16" or "f32".

    OpenVINO decides by the hardware: ``auto`` becomes bf16 where the CPU has native bf16 (AMX or AVX512-BF16) and f32
    elsewhere, and a bf16 hint on a CPU without it quietly runs f32. Read from a compiled one-op model, because only
    the compiled model tells what the plugin really chose.
    """
    hint = {"auto": None, "fp32": "f32", "bf16": "bf16"}[precision]
    if hint not in _OV_PRECISION:
        import openvino as ov
        from openvino import opset13 as ops

        x = ops.parameter([1, 16], np.float32)
        probe = ov.Model([ops.matmul(x, ops.constant(np.ones((16, 16), np.float32)), False, False)], [x])
        compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": hint} if hint else {})
        _OV_PRECISION[hint] = str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
    return _OV_PRECISION[hint]


def check_precision(precision: str, engine: str) -> str:
    if precision not in PRECISIONS:
        raise T2IError(f"precision '{precision}' is not known; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and engine != "openvino":
        raise T2IError("precision 'bf16' needs the openvino engine; onnxruntime runs the graph's own types")
    return precision
