"""The exporter's contract, as data: what each component's graph takes and gives, and how close it must stay to
the torch model it came from."""

from __future__ import annotations

from dataclasses import dataclass

#: None lets optimum pick its default opset for each SD component (18 with torch 2.13): every op SD2 needs exists
#: there and both onnxruntime and OpenVINO's ONNX frontend read it; pinning another buys nothing the runtime uses.
OPSET: int | None = None


@dataclass(frozen=True)
class Component:
    """One exported graph."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: str
    #: Largest allowed max|exported - torch| / max|torch| on the check input, per precision.
    tolerance: dict[str, float]


COMPONENTS: tuple[Component, ...] = (
    Component("text_encoder", ("input_ids",), ("last_hidden_state", "pooler_output"), "batch, sequence",
              {"fp32": 1e-3, "fp16": 3e-2}),
    Component("unet", ("sample", "timestep", "encoder_hidden_states"), ("out_sample",),
              "batch, height, width, sequence; timestep is a float scalar", {"fp32": 1e-3, "fp16": 3e-2}),
    Component("vae_decoder", ("latent_sample",), ("sample",), "batch, latent height, latent width",
              {"fp32": 1e-3, "fp16": 3e-2}),
)

FORMATS = ("onnx", "openvino")
#: int8 is OpenVINO only: the UNet quantized with NNCF on calibration data, the rest with int8 weights.
PRECISIONS = ("fp32", "fp16", "int8")
#: How a checkpoint becomes graphs: torch (optimum's export), template (torch-free), auto (torch where installed).
CONVERTERS = ("auto", "torch", "template")
