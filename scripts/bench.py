"""Run the benchmark outside the CLI (CI does not run it): ``python scripts/bench.py [text2image bench options]``.

Example: ``python scripts/bench.py --latents 64 --batches 1 --only openvino,diffusers``.
"""

from __future__ import annotations

import sys

from backend.cli import cli

if __name__ == "__main__":
    cli(["bench", *sys.argv[1:]])
