"""TAESD: a tiny distilled VAE decoder (madebyollin/taesd), 18× cheaper than SD's VAE decoder at 512².

It changes pixels more than any precision does, so it is an opt-in extra decoder in the bundle
(``taesd_decoder/``) that the runtime uses only when asked (``decoder="taesd"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

FOLDER = "taesd_decoder"
#: Relative max error allowed against torch, as for the other components.
TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2}


def build_random_taesd(out: Path, tiny: bool) -> Path:
    """A randomly initialised TAESD: full-size (the published architecture) or tiny for tests."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model: Any
    if tiny:
        model = AutoencoderTiny(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16,) * 4,
                                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
    else:
        model = AutoencoderTiny()
    model.save_pretrained(out)
    return out


def load_taesd(source: str, workdir: Path) -> Any:
    """The torch AutoencoderTiny for SOURCE: 'tiny', 'random', a folder or a hub id."""
    from diffusers import AutoencoderTiny

    if source in ("tiny", "random"):
        path = build_random_taesd(workdir / f"taesd-{source}", tiny=source == "tiny")
    elif Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
    else:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(source, allow_patterns=["config.json", "*.safetensors"]))
    return AutoencoderTiny.from_pretrained(path).eval()


def _decode_module(model: Any) -> Any:
    """The model as a module whose forward is exactly ``decode``: latents → image in [-1, 1]."""
    import torch

    class Decode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.model.decode(latent_sample).sample

    return Decode().eval()


def is_taesd(model: Any) -> bool:
    """Whether a diffusers VAE is a TAESD (``AutoencoderTiny``), as SDXS ships in its ``vae/`` folder."""
    from diffusers import AutoencoderTiny

    return isinstance(model, AutoencoderTiny)


def export_taesd(model: Any, out: Path, folder: str = FOLDER) -> Path:
    """Write ``out/<folder>/model.onnx`` (by default the extra ``taesd_decoder``; ``vae_decoder`` for a model
    whose own VAE is TAESD) and its config.json; return the graph path."""
    import torch

    target = out / folder
    target.mkdir(parents=True, exist_ok=True)
    model.save_config(target)
    graph = target / "model.onnx"
    dummy = torch.randn(1, model.config.latent_channels, 32, 32)
    axes = {0: "batch_size", 2: "latent_height", 3: "latent_width"}
    image_axes = {0: "batch_size", 2: "height", 3: "width"}
    torch.onnx.export(_decode_module(model), (dummy,), str(graph), input_names=["latent_sample"],
                      output_names=["sample"], dynamic_axes={"latent_sample": axes, "sample": image_axes},
                      opset_version=17, dynamo=False)
    return graph
