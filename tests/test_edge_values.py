"""Values at the edges of what the services accept: retry waits that run for days, the largest seed, and the
sizes offered once an admin chose a default."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.nextcloud.client import Backoff
from runtime import validation as v
from runtime.errors import InvalidRequest
from runtime.request import Defaults, GenerationRequest


def test_a_backoff_keeps_waiting_however_often_it_is_asked() -> None:
    # 2**1024 overflowed a float: a process left waiting for its app to be enabled lost its loop after ~17 h.
    backoff = Backoff(first=1.0, cap=60.0)
    waits = [backoff.next() for _ in range(2000)]
    assert max(waits) <= 60.0 * 1.2 and waits[-1] >= 60.0 * 0.8


def test_the_largest_seed_leaves_room_for_every_image() -> None:
    # Image i uses seed + i: each must be a seed one may ask for, else a task failed after its first batch.
    assert GenerationRequest(prompt="a fox", n=4, seed=v.MAX_SEED - 3).seed == v.MAX_SEED - 3
    with pytest.raises(InvalidRequest, match=f"seed {v.MAX_SEED - 2} is too large for 4 images"):
        GenerationRequest(prompt="a fox", n=4, seed=v.MAX_SEED - 2)


def test_the_sizes_offered_stay_at_the_models_scale_whatever_default_an_admin_chose(onnx_bundle: Path) -> None:
    from standalone_helpers import load_service

    service = load_service(onnx_bundle)
    own = service.allowed_sizes()
    service.pipeline.use_defaults(Defaults(width=384, height=256))
    assert service.allowed_sizes() == own and "384x256" in own
    assert service.defaults.size == "384x256" and service.bundle_defaults.size == next(iter(own))
