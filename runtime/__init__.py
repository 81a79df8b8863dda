"""Torch-free SD2 inference: load an exported bundle and turn prompts into images.

>>> from runtime import LoadOptions, Pipeline
>>> pipe = Pipeline.load("bundles/sd-turbo", LoadOptions(device="auto", engine="auto", threads=0))
>>> images = pipe.generate("a red fox in the snow", n=2, seed=7)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runtime.errors import (
    BundleError,
    ConfigError,
    EngineError,
    GenerationCancelled,
    InvalidRequest,
    T2IError,
    Unavailable,
)

if TYPE_CHECKING:
    from runtime.bundle import Bundle
    from runtime.options import LoadOptions
    from runtime.pipeline import Generated, Pipeline
    from runtime.request import Defaults, GenerationRequest

__all__ = ["Bundle", "BundleError", "ConfigError", "Defaults", "EngineError", "Generated", "GenerationCancelled",
           "GenerationRequest", "InvalidRequest", "LoadOptions", "Pipeline", "T2IError", "Unavailable"]


def __getattr__(name: str) -> Any:
    # Loaded on first use, so importing a small piece (errors, bundle) stays cheap.
    if name == "Bundle":
        from runtime.bundle import Bundle

        return Bundle
    if name == "LoadOptions":
        from runtime.options import LoadOptions

        return LoadOptions
    if name in ("GenerationRequest", "Defaults"):
        from runtime import request

        return getattr(request, name)
    if name in ("Pipeline", "Generated"):
        from runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(name)
