"""After export, each component is run on a sample input both in torch and in the exported graph; a deviation
over the contract's tolerance fails the export with the measured error."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import T2IError


class ExportCheckError(T2IError, RuntimeError):
    """The exported graph does not reproduce the torch model within tolerance."""


def sample_inputs(name: str, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A small deterministic input for a component, shaped from its config (config.json's values)."""
    rng = np.random.default_rng(0)
    if name == "text_encoder":
        ids = rng.integers(0, config["vocab_size"], size=(1, config["max_position_embeddings"]), dtype=np.int64)
        return {"input_ids": ids}
    if name == "unet":
        side = min(int(config.get("sample_size") or 32), 32)
        return {
            "sample": rng.standard_normal((2, config["in_channels"], side, side), dtype=np.float32),
            "timestep": np.array(500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, config["cross_attention_dim"]), dtype=np.float32),
        }
    side = 32
    return {"latent_sample": rng.standard_normal((1, config["latent_channels"], side, side), dtype=np.float32)}


def model_config(model: Any) -> dict[str, Any]:
    """A torch model's config as a plain dict (diffusers keeps a mapping, transformers an object)."""
    cfg = model.config
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def torch_reference(name: str, model: Any, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The torch model's output for ``feeds``."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if name == "text_encoder":
            out = model(t["input_ids"])[0]
        elif name == "unet":
            out = model(t["sample"], t["timestep"], t["encoder_hidden_states"]).sample
        elif name == "taesd_decoder":
            out = model.decode(t["latent_sample"]).sample
        else:
            out = model(t["latent_sample"]).sample  # optimum's vae_decoder is the VAE with forward = decode
    return out.float().numpy()


def exported_output(graph: Path, feeds: dict[str, np.ndarray], on_cuda: bool = False) -> np.ndarray:
    """The exported graph's first output for ``feeds`` (onnxruntime for .onnx, on its CUDA provider when
    ``on_cuda``; OpenVINO f32 for .xml)."""
    if graph.suffix == ".onnx":
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider"] if on_cuda else ["CPUExecutionProvider"]
        sess = ort.InferenceSession(str(graph), providers=providers)
        return np.asarray(sess.run(None, feeds)[0], dtype=np.float32)
    import openvino as ov

    compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return np.asarray(compiled(feeds)[0], dtype=np.float32)


def check_component(name: str, model: Any, graph: Path, tolerance: float, on_cuda: bool = False) -> float:
    """Return the relative error max|exported - torch| / max|torch|; raise when it exceeds ``tolerance``."""
    feeds = sample_inputs(name, model_config(model))
    return compare(name, exported_output(graph, feeds, on_cuda), torch_reference(name, model, feeds), tolerance,
                   "the torch model")


def compare(name: str, got: np.ndarray, ref: np.ndarray, tolerance: float, reference: str) -> float:
    """The relative error max|got - ref| / max|ref|; raise when it exceeds ``tolerance``."""
    if got.shape != ref.shape:
        raise ExportCheckError(f"{name}: exported output shape {got.shape} differs from {reference}'s {ref.shape}")
    for what, values in (("exported graph", got), (reference, ref)):
        if not np.isfinite(values).all():
            raise ExportCheckError(f"{name}: the {what}'s output holds NaN or infinite values; the checkpoint's "
                                   "weights are damaged")
    err = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-6))
    if not np.isfinite(err) or err > tolerance:
        raise ExportCheckError(
            f"{name}: exported graph deviates from {reference} by {err:.3g} (relative max error), "
            f"over the tolerance {tolerance:g}"
        )
    return err
