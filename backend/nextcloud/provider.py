"""The ``core:text2image`` provider this ExApp registers for each configured model: its id, optional inputs
(size as an enum of the sizes offered, steps, guidance, negative prompt, seed, scheduler), the model's defaults
and an expected runtime measured on this machine."""

from __future__ import annotations

import math
import re

from nc_py_api.ex_app.providers.task_processing import (
    ShapeDescriptor,
    ShapeEnumValue,
    ShapeType,
    TaskProcessingProvider,
)

from backend.nextcloud.client import TASK_TYPE
from backend.tasks.service import ImageService
from backend.tasks.task_input import OPTIONAL_INPUTS
from runtime.request import GenerationRequest
from runtime.schedulers import SCHEDULER_NAMES

APP_ID = "text2image_sd2"

_TYPES = {"size": ShapeType.ENUM, "steps": ShapeType.NUMBER, "guidance": ShapeType.NUMBER,
          "negative_prompt": ShapeType.TEXT, "seed": ShapeType.NUMBER, "scheduler": ShapeType.ENUM}


def model_names(setting: str) -> list[str]:
    """The models configured in ``T2I_MODEL``: one name, hub id or folder, or several separated by commas."""
    return [m.strip() for m in setting.split(",") if m.strip()]


def provider_id(model: str, app_id: str = APP_ID) -> str:
    """``<app id>:<model>``: a short name as it is, a hub id or folder by its last part (``a/b`` → ``b``)."""
    name = model.rstrip("/").rsplit("/", 1)[-1]
    return f"{app_id}:{re.sub(r'[^A-Za-z0-9._-]+', '-', name).strip('-') or 'model'}"


def expected_runtime(service: ImageService) -> int:
    """Seconds one default image takes on this machine, from the service's measured speed."""
    return max(1, math.ceil(service.expected_seconds(GenerationRequest(prompt="x"))))


def build_provider(model: str, service: ImageService, app_id: str = APP_ID) -> TaskProcessingProvider:
    """The provider description for ``model``, loaded in ``service``."""
    defaults = service.defaults
    sizes = service.allowed_sizes()
    descriptions = dict(OPTIONAL_INPUTS)
    descriptions["steps"] += f"; this model's default is {defaults.steps}"
    descriptions["guidance"] += f"; this model's default is {defaults.guidance:g}"
    shapes = [ShapeDescriptor(name=key, description=text, shape_type=_TYPES[key])
              for key, text in descriptions.items()]
    return TaskProcessingProvider(
        id=provider_id(model, app_id),
        name=f"Local image generation: Stable Diffusion 2 ({service.model_name})",
        task_type=TASK_TYPE,
        expected_runtime=expected_runtime(service),
        optional_input_shape=shapes,
        input_shape_defaults={"numberOfImages": 1},
        optional_input_shape_enum_values={
            "size": [ShapeEnumValue(name=label, value=size) for size, label in sizes.items()],
            "scheduler": [ShapeEnumValue(name=s, value=s) for s in SCHEDULER_NAMES],
        },
        optional_input_shape_defaults={
            "size": defaults.size,
            "steps": int(defaults.steps or 0),
            "guidance": float(defaults.guidance or 0),
            "scheduler": str(defaults.scheduler),
        },
    )
