"""Image-quality measures for benchmarks, parity scripts and tests (not used to generate images)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def psnr(a: Sequence[Image.Image] | np.ndarray, b: Sequence[Image.Image] | np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two image sets (8-bit); inf when identical."""
    x = np.stack([np.asarray(i, dtype=np.float64) for i in a])
    y = np.stack([np.asarray(i, dtype=np.float64) for i in b])
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
