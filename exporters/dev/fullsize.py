"""The exact SD2.1 architectures with random weights, for speed and memory measurements and the graph templates.

Speed does not depend on the weights' values, so a benchmark can run the real shapes without downloading 5 GB.
The config values are the published ones of stabilityai/stable-diffusion-2-1-base (UNet 865,910,724 parameters),
token ids of its text encoder included; ``variant="v"`` is stable-diffusion-2-1 (768², v-prediction,
``upcast_attention``), whose networks are otherwise the same. :func:`build_sdxs_model` is SDXS-512, the one-step
model distilled from sd-turbo (UNet 328,177,284 parameters, TAESD as its VAE).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from exporters.tiny import TEXT_LENGTH, save_pipeline

UNET_PARAMS = 865_910_724
#: The published text encoder's token ids (OpenCLIP's conversion: eos_token_id 2 selects transformers' legacy
#: pooling by argmax, which is part of the graph).
SD2_TEXT_TOKEN_IDS = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}


def sd2_text_encoder() -> Any:
    """A random text encoder of SD2.1's published architecture (OpenCLIP ViT-H's text tower, 23 layers, 1024 wide)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="gelu",
        projection_dim=512,
        **SD2_TEXT_TOKEN_IDS,
    ))


def build_full_model(out: Path, seed: int = 0, variant: Literal["epsilon", "v"] = "epsilon") -> Path:
    """Save a randomly initialised SD2.1-base (or, with ``variant="v"``, SD2.1 768) diffusers folder at ``out``
    (about 5 GB in fp32)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel

    out = Path(out)
    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(
        sample_size=96 if variant == "v" else 64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
        upcast_attention=variant == "v",
    )
    n_params = sum(p.numel() for p in unet.parameters())
    if n_params != UNET_PARAMS:
        raise RuntimeError(f"full-size UNet has {n_params} parameters, SD2.1-base has {UNET_PARAMS}")
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=768,
        scaling_factor=0.18215,
    )
    text_encoder = sd2_text_encoder()
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
             "set_alpha_to_one": False}
    scheduler = (DDIMScheduler(**betas, clip_sample=False, prediction_type="v_prediction") if variant == "v"
                 else PNDMScheduler(**betas, skip_prk_steps=True, prediction_type="epsilon"))
    return save_pipeline(out, unet, vae, text_encoder, scheduler)


#: SDXS-512's UNet (IDKiro/sdxs-512-0.9): SD2.1-base's first three levels with one block each, no mid block, the
#: 320-channel level attending to the text in its first attention as well.
SDXS_UNET_PARAMS = 328_177_284


def build_sdxs_model(out: Path, seed: int = 0) -> Path:
    """Save a randomly initialised SDXS-512 diffusers folder at ``out`` (about 2.8 GB in fp32): its UNet, TAESD
    (``AutoencoderTiny``) as the VAE, SD2.1's text encoder and sd-turbo's Euler scheduler."""
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    from exporters.tiny import sdxs_scheduler

    out = Path(out)
    torch.manual_seed(seed)
    unet: Any = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        mid_block_type=None,
        only_cross_attention=(True, False, False),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    n_params = sum(p.numel() for p in unet.parameters())
    if n_params != SDXS_UNET_PARAMS:
        raise RuntimeError(f"full-size SDXS UNet has {n_params} parameters, SDXS-512 has {SDXS_UNET_PARAMS}")
    # AutoencoderTiny's defaults are TAESD's published architecture (decoder: 64 channels, 3-3-3-1 blocks).
    vae = AutoencoderTiny()
    text_encoder = sd2_text_encoder()
    return save_pipeline(out, unet, vae, text_encoder, sdxs_scheduler())
