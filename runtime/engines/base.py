"""What every engine's session offers: the graph's inputs as declared, and ``run``. Below both engines, so that
:mod:`runtime.engines.ort` and :mod:`runtime.engines.openvino` share it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class InputSpec:
    """A graph input as the graph declares it: the dtype to feed and the shape (None or a name for dynamic axes)."""

    name: str
    dtype: type
    shape: tuple[int | str | None, ...]


class Session(Protocol):
    """One loaded graph. ``run`` takes numpy feeds by input name and returns the outputs in graph order."""

    inputs: dict[str, InputSpec]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...
