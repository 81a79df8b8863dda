"""Build (or check) the graph templates that let the torch-free images convert checkpoints into bundles.

    python scripts/build_templates.py tiny [--check]       # the tiny test models (about 30 s)
    python scripts/build_templates.py tiny-sdxs [--check]  # the tiny test model of SDXS's layout (about 20 s)
    python scripts/build_templates.py sd2 [--check]        # sd-turbo, sd2.1-base, sd2.1 (full size: ~25 GB of
                                                           # scratch disk, ~16 GB of memory, about 20 min on 2 cores)
    python scripts/build_templates.py sdxs [--check]       # SDXS-512 (full size)

Needs the export extra. Each build exports two random redraws of the architecture with torch and proves that the
second one, bound into the templates of the first, gives the very graphs torch exported (see
exporters/dev/template_build.py). ``--check`` builds into a scratch folder and fails when the shipped templates differ;
the test suite runs the tiny check on every run. Run the sd2 build again after changing the pinned export stack.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporters.dev.template_build import build_templates, stale_files
from exporters.graph_template import TEMPLATES


def source(architecture: str, work: Path) -> Path:
    if architecture == "tiny":
        from exporters.tiny import build_tiny_model

        return build_tiny_model(work / "tiny")
    if architecture == "tiny-sdxs":
        from exporters.tiny import build_tiny_sdxs_model

        return build_tiny_sdxs_model(work / "tiny-sdxs")
    from exporters.dev.fullsize import build_full_model, build_sdxs_model

    return build_sdxs_model(work / "sdxs") if architecture == "sdxs" else build_full_model(work / "sd2")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("architecture", choices=["tiny", "tiny-sdxs", "sd2", "sdxs"])
    ap.add_argument("--check", action="store_true", help="compare with the shipped templates instead of writing")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="t2i-templates-") as tmp:
        src = source(args.architecture, Path(tmp))
        root = Path(tmp) / "out" if args.check else TEMPLATES
        built = build_templates(src, args.architecture, root=root)
        if args.check:
            differ = stale_files(built, TEMPLATES / args.architecture)
            if differ:
                sys.exit(f"stale templates: {', '.join(differ)}; run scripts/build_templates.py {args.architecture}")
            print(f"{args.architecture}: the shipped templates are current")


if __name__ == "__main__":
    main()
