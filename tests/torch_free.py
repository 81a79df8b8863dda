"""What an image without the export extra sees, for subprocess tests: torch, diffusers, transformers, optimum and
NNCF refuse to import (the dev environment has them, the images do not), optionally less free disk than there is."""

from __future__ import annotations

from pathlib import Path

BLOCKED = ("torch", "diffusers", "transformers", "optimum", "nncf")

_SITECUSTOMIZE = """
import importlib.abc, os, sys

BLOCKED = {blocked!r}


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{{name}} is not installed in this image', name=name)


sys.meta_path.insert(0, _Block())

if os.environ.get('T2I_TEST_FREE_BYTES'):
    # A disk that is this full: what shutil.disk_usage reports, the one call the store's room check makes.
    import collections, shutil
    _usage = collections.namedtuple('usage', 'total used free')
    _free = int(os.environ['T2I_TEST_FREE_BYTES'])
    shutil.disk_usage = lambda path: _usage(10 * _free, 9 * _free, _free)
"""


def site_dir(tmp: Path) -> Path:
    """A folder to put first on PYTHONPATH: its sitecustomize blocks the torch stack at interpreter start."""
    folder = tmp / "torch-free-site"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(blocked=BLOCKED))
    return folder
