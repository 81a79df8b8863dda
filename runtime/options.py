"""The choices a caller makes when loading a pipeline, as types (standard library only, so that the application's
settings can name them without loading an engine)."""

from __future__ import annotations

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

ENGINES: tuple[str, ...] = get_args(EngineChoice)
#: The devices by name; "cuda:N" names GPU N.
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS: tuple[str, ...] = get_args(PrecisionChoice)
