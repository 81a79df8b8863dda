"""OpenVINO IR from the exported ONNX graphs, read by OpenVINO's own ONNX frontend, so both formats come from the
same traced graphs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert(onnx_path: Path, xml_path: Path, precision: str) -> Path:
    """Write ``openvino_model.xml`` + ``.bin``; fp16 compresses the weights (OpenVINO computes in its own
    inference precision)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=precision == "fp16")
    return xml_path


def replace_graph(xml: Path, model: Any) -> None:
    """Write ``model`` over the IR at ``xml``: beside it first, then swapped in, so an interrupted run never leaves
    half a file. The weights are written as they are (no further fp16 compression)."""
    import openvino as ov

    tmp = xml.with_name("replacing_tmp.xml")
    ov.save_model(model, str(tmp), compress_to_fp16=False)
    tmp.replace(xml)
    tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
