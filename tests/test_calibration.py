"""The service measures its speed at the defaults requests get, and on a CPU that compiles per shape it compiles that
shape before the first request: an admin's other default size or guidance cost the first task after each start a
compile (9.4 s of its 10 s on an AMX Xeon with the full-size UNet, measured through a real Nextcloud)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from backend.config import Settings
from backend.tasks.service import ImageService
from runtime.request import Defaults, GenerationRequest


def _compiles(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled unet for")]


def test_the_defaults_shape_is_compiled_and_timed_before_its_first_request(openvino_bundle: Path,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="runtime.engines.openvino")
    service = ImageService(Settings().updated(threads=1, static_shapes="true"))
    service.load(bundle=openvino_bundle)
    own = service.bundle_defaults
    assert own.guidance and own.guidance > 1, "the tiny bundle's own default guides (UNet batch 2)"
    assert len(_compiles(caplog)) == 1, "load compiled the bundle's own default shape once"
    assert not service.warm_defaults(), "nothing changed: no second calibration"

    # An admin's sd-turbo-like defaults: no guidance (UNet batch 1) at another size.
    service.pipeline.use_defaults(Defaults(width=own.width + 64, height=own.height, guidance=0.0))  # type: ignore
    caplog.clear()
    assert service.warm_defaults()
    f = service.bundle.vae_scale_factor
    compiled = _compiles(caplog)
    assert len(compiled) == 1 and f"'sample': (1, 4, {own.height // f}, {(own.width + 64) // f})" in compiled[0], \
        compiled
    caplog.clear()
    images = service.run(GenerationRequest(prompt="a fox", seed=1))
    assert images and _compiles(caplog) == [], "the first request at the new defaults compiled nothing"

    # Estimates are scaled from the shape measured: one step at the defaults is the calibration run, per image.
    measured = service._step_seconds + service._decode_seconds
    assert service.expected_seconds(GenerationRequest(prompt="a", steps=1, n=8)) == pytest.approx(8 * measured)
    guided = service.expected_seconds(GenerationRequest(prompt="a", steps=10, guidance=7.5))
    assert guided > service.expected_seconds(GenerationRequest(prompt="a", steps=10))
