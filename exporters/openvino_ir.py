"""OpenVINO IR from the exported ONNX graphs, read by OpenVINO's own ONNX frontend, so both formats come from the
same traced graphs."""

from __future__ import annotations

from pathlib import Path


def convert(onnx_path: Path, xml_path: Path, precision: str) -> Path:
    """Write ``openvino_model.xml`` + ``.bin``; fp16 compresses the weights (OpenVINO computes in its own
    inference precision)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=precision == "fp16")
    return xml_path
