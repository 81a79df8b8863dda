"""onnxruntime sessions (CPU or CUDA) with the thread cap, IOBinding and CUDA graphs."""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.engines.base import InputSpec
from runtime.engines.cuda import cuda_index
from runtime.errors import BundleError, ConfigError, EngineError
from runtime.options import DeviceChoice

log = logging.getLogger(__name__)

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class OrtSession:
    """An onnxruntime InferenceSession with the thread cap and the provider check applied.

    On CUDA the graph runs through IOBinding: per input shape, device buffers for the inputs and outputs are
    allocated once and reused, so a denoising step costs one host→device copy of the new inputs and one copy of
    the result back. With ``cuda_graph`` the CUDA provider also captures each shape's kernel launches into a CUDA
    graph on first use and replays it afterwards (static shapes; up to :attr:`MAX_GRAPHS` shapes).
    ``io_binding`` forces the bound path on or off (it also runs on the CPU, which the tests use).
    """

    MAX_GRAPHS = 4

    def __init__(self, path: Path, device: DeviceChoice, threads: int, io_binding: bool | None = None,
                 cuda_graph: bool = False) -> None:
        import onnxruntime as ort

        self._name = path.parent.name
        opts = ort.SessionOptions()
        # One pool of `threads` workers inside each op; ops run one after another (the graph is a chain anyway).
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list[Any] = ["CPUExecutionProvider"]
        gpu = cuda_index(device)
        if cuda_graph and gpu is None:
            raise ConfigError(f"CUDA graphs need a CUDA device; device '{device}' is not one")
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
                raise BundleError(
                    f"{path} uses {missing[1]}, a fused op that onnxruntime runs on CUDA only: this bundle was "
                    "optimized for GPUs; load it with --device cuda, or use a bundle made for the CPU (plain ONNX "
                    "or OpenVINO)"
                ) from None
            raise BundleError(
                f"onnxruntime could not load {path}: {exc}. The file may be truncated or corrupt; re-export it"
            ) from None
        got = self._session.get_providers()
        if gpu is not None and got[0] != "CUDAExecutionProvider":
            raise EngineError(f"asked for CUDA for {path.parent.name} but onnxruntime gave {got}")
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
        try:
            return self._run(feeds)
        except Exception as exc:  # onnxruntime's own exception types; the cause stays chained for the log
            shapes = {name: list(arr.shape) for name, arr in feeds.items()}
            raise EngineError(f"onnxruntime failed to run {self._name} on inputs {shapes}: {exc}") from exc

    def _run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
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


