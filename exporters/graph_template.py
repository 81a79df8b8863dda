"""Graph templates: the torch export's ONNX graph of one architecture with its weights left out, plus where each
weight comes from in a diffusers checkpoint. Binding a checkpoint's safetensors into a template gives the graph the
torch export would have written for it, without torch.

A template is two files per component under ``exporters/templates/<architecture>/``:

* ``<component>.onnx``: the exported graph minus every weight. What stays are the weight-independent constants the
  exporter folded in (shape arithmetic, the timestep frequencies, GroupNorm's unit scales).
* ``<component>.json``: the component config the graph was exported from (and the class defaults, to fill keys an
  older checkpoint leaves out), and one binding per weight: graph tensor name, state-dict key, whether the tensor is
  the transposed weight (optimum's MatMul weights), and its shape.

Templates are built by ``exporters.dev.template_build`` (which needs torch) and checked there against a second torch
export; this module only reads them, so the torch-free images can use them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import T2IError, quoted

TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE_FORMAT = 1

#: Where each bundle component's weights and config live in a diffusers checkpoint, and the safetensors stem.
CHECKPOINT_FOLDERS: dict[str, tuple[str, str]] = {
    "text_encoder": ("text_encoder", "model"),
    "unet": ("unet", "diffusion_pytorch_model"),
    "vae_decoder": ("vae", "diffusion_pytorch_model"),
}

#: Config keys that do not change a component's exported fp32 graph, so a template covers any value of them.
#: Each is either bookkeeping, a value the runtime reads from config.json itself, or one the fp32 graph ignores.
NEUTRAL_KEYS: dict[str, frozenset[str]] = {
    "common": frozenset({"_class_name", "_diffusers_version", "_name_or_path", "_commit_hash", "_use_default_values",
                         "architectures", "transformers_version", "torch_dtype", "dtype"}),
    # sample_size: the graph's height and width are dynamic. upcast_attention: only changes fp16 math (the fp32
    # graphs of the tiny model with and without it are identical); the fp16 conversion reads it from the config.
    "unet": frozenset({"sample_size", "upcast_attention"}),
    # The runtime reads the latent scaling from config.json; the decoder graph never sees it. A TAESD decoder
    # (SDXS) never sees its encoder's layout either, nor latent_magnitude and latent_shift, which only scale the
    # encoder's latents for storage.
    "vae_decoder": frozenset({"sample_size", "scaling_factor", "shift_factor", "force_upcast", "latents_mean",
                              "latents_std", "encoder_block_out_channels", "num_encoder_blocks", "latent_magnitude",
                              "latent_shift"}),
    # Training-only values, and token ids the text model's forward pass never reads (eos_token_id it does read).
    "text_encoder": frozenset({"initializer_range", "initializer_factor", "dropout", "attention_dropout",
                               "projection_dim", "bos_token_id", "pad_token_id"}),
}


class TemplateError(T2IError, RuntimeError):
    """A checkpoint cannot be bound into a template; the message says why and what to do."""


@dataclass(frozen=True)
class Binding:
    """One weight of the graph: the tensor ``name`` is the state-dict tensor ``key``, transposed when
    ``transpose``, with ``shape``."""

    name: str
    key: str
    transpose: bool
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Template:
    """One component's template (see the module docstring)."""

    architecture: str
    component: str
    config: dict[str, Any]
    defaults: dict[str, Any]
    bindings: tuple[Binding, ...]
    graph: Path
    built_with: dict[str, str]

    @classmethod
    def load(cls, folder: Path, component: str) -> Template:
        meta = json.loads((folder / f"{component}.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != TEMPLATE_FORMAT:
            raise TemplateError(f"template {folder / component} has format {meta.get('format_version')!r}, "
                                f"this exporter reads {TEMPLATE_FORMAT}")
        return cls(
            architecture=folder.name,
            component=component,
            config=meta["config"],
            defaults=meta["defaults"],
            bindings=tuple(Binding(b[0], b[1], bool(b[2]), tuple(b[3])) for b in meta["bindings"]),
            graph=folder / f"{component}.onnx",
            built_with=meta.get("built_with", {}),
        )

    def differences(self, config: Mapping[str, Any]) -> list[str]:
        """The config fields in which ``config`` differs from the one this graph was exported from, as
        ``component.field: checkpoint value (template value)``; empty when the template covers it."""
        neutral = NEUTRAL_KEYS["common"] | NEUTRAL_KEYS[self.component]
        if "decoder_block_out_channels" in config and "block_out_channels" not in config:
            # AutoencoderTiny records its decoder's channels again as block_out_channels, in its __init__ rather
            # than as an argument (so it has no class default): a config saved without it means the same.
            config = {**config, "block_out_channels": config["decoder_block_out_channels"]}
        found = []
        for key in sorted((set(config) | set(self.config)) - neutral):
            theirs = _normal(config[key]) if key in config else _normal(self.defaults.get(key, _MISSING))
            ours = _normal(self.config.get(key, self.defaults.get(key, _MISSING)))
            if theirs != ours:
                found.append(f"{self.component}.{key}: {_show(theirs)} (template: {_show(ours)})")
        return found

    def bind(self, weights: Path, out: Path, on_tensor: Callable[[int, int], None] | None = None) -> Path:
        """Write ``out/model.onnx`` with the checkpoint's tensors from the safetensors file ``weights`` in
        ``out/model.onnx_data``, read and written one tensor at a time (the checkpoint is never in memory whole).
        fp16 and fp32 checkpoints both give the fp32 graph the torch export writes. ``on_tensor(done, total)``
        follows the progress."""
        import onnx
        from onnx import TensorProto
        from safetensors import SafetensorError, safe_open

        from exporters.checkpoint_files import CheckpointError, read_header

        stored = read_header(weights)
        missing = [b.key for b in self.bindings if b.key not in stored]
        if missing:
            raise TemplateError(f"{weights} lacks {len(missing)} tensor(s) the {self.component} needs, e.g. "
                                f"{', '.join(quoted(k) for k in missing[:3])}; the file is not a {self.architecture} "
                                "checkpoint")
        for b in self.bindings:
            info = stored[b.key]
            if info.dtype not in ("F32", "F16"):
                raise TemplateError(f"{weights}: tensor {b.key} is {info.dtype}; only F32 and F16 checkpoints convert")
            # The shape the graph was exported with, where the graph may add trailing unit axes (a GroupNorm's [C]
            # scale is [C, 1, 1] there): the same element count in another shape (a transposed matrix, a flattened
            # kernel) would run with scrambled weights.
            expected = tuple(reversed(b.shape)) if b.transpose else b.shape
            kept = len(info.shape)
            if info.shape != expected[:kept] or any(d != 1 for d in expected[kept:]):
                raise TemplateError(f"{weights}: tensor {b.key} has the shape {list(info.shape)}, the "
                                    f"{self.architecture} {self.component} expects {list(expected)}")
        model = onnx.load(str(self.graph))
        out.mkdir(parents=True, exist_ok=True)
        data_name = "model.onnx_data"
        offset = 0
        try:
            f_cm = safe_open(str(weights), framework="np")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights} cannot be read as safetensors: "
                                  f"{quoted(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
        with f_cm as f, (out / data_name).open("wb") as data:
            for i, b in enumerate(self.bindings):
                array = f.get_tensor(b.key).astype(np.float32, copy=False)
                if not np.isfinite(array).all():
                    raise TemplateError(f"{weights}: tensor {b.key} holds NaN or infinite values; the checkpoint is "
                                        "damaged")
                if b.transpose:
                    array = array.T
                raw = np.ascontiguousarray(array).reshape(b.shape).tobytes()
                proto = TensorProto(name=b.name, data_type=TensorProto.FLOAT, dims=list(b.shape))
                proto.data_location = TensorProto.EXTERNAL
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(len(raw)))):
                    entry = proto.external_data.add()
                    entry.key, entry.value = k, v
                model.graph.initializer.append(proto)
                data.write(raw)
                offset += len(raw)
                # 64-byte alignment, so a reader may map the tensors in place.
                pad = -offset % 64
                data.write(b"\0" * pad)
                offset += pad
                if on_tensor is not None:
                    on_tensor(i + 1, len(self.bindings))
        onnx.save_model(model, str(out / "model.onnx"))
        return out / "model.onnx"


_MISSING = "<not set>"


def _normal(value: Any) -> Any:
    """JSON-comparable form: tuples as lists, as config.json stores them."""
    return json.loads(json.dumps(value))


def _show(value: Any, limit: int = 100) -> str:
    """A config value as JSON, cut to about ``limit`` characters: the value comes from outside."""
    text = value if value == _MISSING else json.dumps(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def architectures() -> list[str]:
    """The architectures templates ship for."""
    return sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and (p / "unet.json").is_file())


def read_checkpoint_configs(read: Callable[[str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each bundle component's config from a checkpoint, ``read(relative path)`` giving a JSON file's content (a
    local folder or the hub, before any weight is fetched)."""
    return {component: read(f"{folder}/config.json") for component, (folder, _) in CHECKPOINT_FOLDERS.items()}


def select(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Template]:
    """The templates that cover a checkpoint with these component configs, one per component.

    Raises :class:`TemplateError` naming the differing config fields (against the closest architecture) and the way
    out when none does.
    """
    best: tuple[int, str, list[str]] | None = None
    for arch in architectures():
        templates = {c: Template.load(TEMPLATES / arch, c) for c in CHECKPOINT_FOLDERS}
        diffs = [d for c, t in templates.items() for d in t.differences(configs[c])]
        if not diffs:
            return templates
        if best is None or len(diffs) < best[0]:
            best = (len(diffs), arch, diffs)
    assert best is not None, f"no templates under {TEMPLATES}"
    _, arch, diffs = best
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise TemplateError(
        f"this checkpoint's architecture is not one the torch-free converter covers (closest: {arch}, which differs "
        f"in {shown}). Covered: {', '.join(architectures())} (sd-turbo, sd2.1-base, sd2.1, SDXS-512 and the tiny test "
        "models). "
        "Export it with the export extra instead (pip install 'text2image-sd2[export]', then `text2image export "
        "SOURCE --out DIR`), on this machine or elsewhere, and copy the bundle into the model store"
    )
