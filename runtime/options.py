"""The choices a caller makes when loading a pipeline: :class:`LoadOptions` and the types of its fields (standard
library only, so that the application's settings can extend it without loading an engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

#: An inference engine.
Engine = Literal["onnxruntime", "openvino"]
#: An engine, or auto (chosen by :func:`runtime.engines.choose`).
EngineChoice = Literal["auto", Engine]
#: "auto", "cpu", "cuda" (GPU 0) or "cuda:N" (GPU N, e.g. one worker per GPU).
DeviceChoice = str
#: Math precision: auto leaves each engine its own default; fp32 forces full precision; bf16 is OpenVINO's.
PrecisionChoice = Literal["auto", "fp32", "bf16"]
#: Latents → pixels: the model's own VAE decoder, or the TAESD decoder when the bundle has one.
DecoderChoice = Literal["vae", "taesd"]
#: OpenVINO's compile: auto (per CPU, see :func:`runtime.engines.openvino.static_by_default`), true (one compile per
#: input shape), false (one compile for every shape).
StaticChoice = Literal["auto", "true", "false"]

ENGINES: tuple[str, ...] = get_args(EngineChoice)
#: The devices by name; "cuda:N" names GPU N.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    """How :meth:`runtime.Pipeline.load` runs a bundle: the one list of the runtime's options (the application's
    ``RuntimeSettings`` extends it, so each option is also a ``T2I_*`` setting)."""

    #: auto | cpu | cuda | cuda:N
    device: DeviceChoice = "auto"
    #: auto | onnxruntime | openvino
    engine: EngineChoice = "auto"
    #: Op threads for both engines; 0 = the cores this process may use.
    threads: int = 0
    #: Latent decoder: vae (the model's own) or taesd (much faster, coarser; the bundle must include it).
    decoder: DecoderChoice = "vae"
    #: Math precision: auto (OpenVINO picks bf16 on CPUs with AVX512-BF16/AMX), fp32 (exact), bf16 (OpenVINO).
    precision: PrecisionChoice = "auto"
    #: On CUDA, capture a CUDA graph per image size and replay it (less launch overhead, more GPU memory).
    cuda_graph: bool = False
    #: Keep OpenVINO's compiled models in the cache folder given to the load, so a restart skips compiling. Off by
    #: default: measured on the full-size SD2.1 (2-core AVX2 EPYC, fp16 weights, one compile for all shapes) the
    #: first image after a restart came no sooner (18.7 s against 17.4 s) and the start peaked 2.2 GB higher (the
    #: blob is read whole beside the graph).
    compile_cache: bool = False
    #: OpenVINO: compile a graph anew for each input shape (batch and size; the last two kept) instead of once for all
    #: shapes. auto decides per CPU from measurements: on a 2-core AVX2 EPYC (OpenVINO 2026.4) the shape-free compile
    #: ran the 512² UNet step as fast (0.98-1.00x) and a second size cost 8 MB instead of a second copy of the
    #: weights; on a 2-core Xeon with AMX the per-shape compile ran it 8-10 % faster. So: per shape where the CPU has
    #: AMX, once for all shapes elsewhere.
    static_shapes: StaticChoice = "auto"
