"""A tiny random model with the SD2 component layout, for tests and offline smoke runs.

The weights are random, so its images are noise; what it proves is that every stage (export, tokenizer, scheduler
loop, decode) is wired like the real SD2 family. ``variant="v"`` mirrors sd2.1-768: v-prediction and
``upcast_attention``.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path
from typing import Any, Literal

TINY_SEED = 0
TEXT_LENGTH = 77
#: The names of the random test models built here: SD2's layout (epsilon, v-prediction) and SDXS-512's.
TINY_MODELS = ("tiny", "tiny-v", "tiny-sdxs")


def _tiny_vocab() -> tuple[dict[str, int], list[str]]:
    """Special tokens, '!' (SD2's pad token) and the letters with and without the end-of-word mark."""
    tokens = ["!"]
    tokens += list(string.ascii_lowercase)
    tokens += [c + "</w>" for c in string.ascii_lowercase]
    tokens += ["!</w>", "<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, []


def write_tokenizer(folder: Path) -> None:
    """Write CLIP tokenizer files (vocab.json, merges.txt, configs) loadable by transformers' CLIPTokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _tiny_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "!",
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": TEXT_LENGTH, "do_lower_case": True, **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def special_token_ids() -> dict[str, int]:
    """bos/eos/pad ids of the test vocabulary, for a CLIPTextConfig."""
    vocab, _ = _tiny_vocab()
    return {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
            "pad_token_id": vocab["!"]}


def save_pipeline(out: Path, unet: Any, vae: Any, text_encoder: Any, scheduler: Any) -> Path:
    """Save random SD2 components with the test tokenizer as a diffusers folder at ``out``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="t2i-tokenizer-") as tmp:
        write_tokenizer(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    pipe: Any = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out


def build_tiny_model(out: Path, variant: Literal["epsilon", "v"] = "epsilon") -> Path:
    """Save a tiny random SD2-architecture diffusers folder at ``out`` and return it."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    out = Path(out)
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
        upcast_attention=variant == "v",
    )
    # Four VAE blocks give SD2's 8× latent downsampling, so a 256² image has SD2's 32² latent and the tests stay
    # cheap (at 2× the UNet and VAE attention would run over 16k tokens).
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    text_encoder = tiny_text_encoder()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if variant == "v" else "epsilon",
        timestep_spacing="leading",
    )
    return save_pipeline(out, unet, vae, text_encoder, scheduler)


def tiny_text_encoder() -> Any:
    """A random CLIP text encoder of the tiny models' size (2 layers, 32 wide) over the tiny vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = _tiny_vocab()
    return CLIPTextModel(CLIPTextConfig(
        **special_token_ids(),
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=TEXT_LENGTH,
        hidden_act="gelu",
        projection_dim=32,
    ))


def build_tiny_sdxs_model(out: Path) -> Path:
    """Save a tiny random model with SDXS-512's layout at ``out`` and return it: a UNet of cross-attention blocks
    only, without a mid block, whose first level's self-attention attends to the text instead
    (``only_cross_attention``), a TAESD (``AutoencoderTiny``) as the VAE, and sd-turbo's Euler scheduler."""
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    out = Path(out)
    torch.manual_seed(TINY_SEED)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        mid_block_type=None,
        only_cross_attention=(True, False),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        norm_num_groups=8,
    )
    # Four decoder levels give TAESD's 8× upsampling, as SD2's VAE; one block each keeps it small.
    vae = AutoencoderTiny(encoder_block_out_channels=(16,) * 4, decoder_block_out_channels=(16,) * 4,
                          num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
    text_encoder = tiny_text_encoder()
    return save_pipeline(out, unet, vae, text_encoder, sdxs_scheduler())


def sdxs_scheduler() -> Any:
    """sd-turbo's scheduler, which SDXS-512 ships: Euler, epsilon prediction, trailing timesteps."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, prediction_type="epsilon", timestep_spacing="trailing",
                                  interpolation_type="linear", use_karras_sigmas=False)
