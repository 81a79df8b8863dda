"""The local model store: turn ``--model`` (folder, short name, hub id, or tiny) into a bundle folder, downloading
and exporting when needed."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from runtime.errors import T2IError

log = logging.getLogger(__name__)

TINY_WARNING = (
    "WARNING: model 'tiny' is a RANDOM TEST MODEL built on this machine: its images are noise, not pictures. "
    "Use it to check the installation only."
)
_BUNDLE_FILES = ("unet/model.onnx", "unet/openvino_model.xml")


def _is_bundle(path: Path) -> bool:
    return (path / "model_index.json").is_file() and any((path / f).is_file() for f in _BUNDLE_FILES)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", text).strip("-")


def default_format(engine: str) -> str:
    """OpenVINO runs fastest on x86 CPUs; CUDA needs ONNX. Follow the engine when it is explicit."""
    if engine == "onnxruntime":
        return "onnx"
    if engine == "openvino":
        return "openvino"
    try:
        import openvino  # noqa: F401
    except ImportError:
        return "onnx"
    from runtime.engines import cuda_usable

    return "onnx" if cuda_usable() else "openvino"


def resolve_model(model: str, store: Path, fmt: str, offline: bool = False,
                  say: Callable[[str], None] = print,
                  progress: Callable[[float], None] | None = None) -> Path:
    """Return a bundle folder for ``model``.

    A folder is used as it is. Otherwise the store is searched for ``<name>-<format>``; if it is not there, the
    model is fetched with huggingface_hub (an exported bundle is used directly, a diffusers checkpoint is exported
    when the export extra is installed). ``tiny`` is built locally. ``progress`` receives the fraction of the
    download's files done (0..1).
    """
    local = Path(model).expanduser()
    if local.is_dir() or model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise T2IError(f"model folder '{model}' does not exist")
        return local
    target = store / f"{_slug(model)}-{fmt}"
    if _is_bundle(target) and (target / "manifest.json").is_file():
        return target
    downloaded = store / "downloads" / _slug(model)
    if _is_bundle(downloaded):  # a ready-made bundle fetched earlier: no need to ask the hub again
        return downloaded
    if model in ("tiny", "tiny-v"):
        say(TINY_WARNING)
        return _export(model, fmt, target, say)
    from exporters.catalog import lookup

    info = lookup(model)
    repo = info.source if info else model
    if "/" not in repo:
        raise T2IError(
            f"model '{model}' is not a folder, a hub id (org/name), 'tiny', or a known model name; "
            "see `text2image info` for the known names"
        )
    if offline:
        raise T2IError(_how_to_get(model, target, "offline mode is on (T2I_OFFLINE)"))
    source, revision = _download(repo, downloaded, model, target, progress)
    if _is_bundle(source):
        return source
    bundle = _export(str(source), fmt, target, say, origin={"id": repo, "revision": revision, "kind": "hub"})
    # The checkpoint is only the export's input; keeping it would hold the model twice on disk.
    shutil.rmtree(source, ignore_errors=True)
    return bundle


def _download(repo: str, dest: Path, model: str, target: Path,
              progress: Callable[[float], None] | None = None) -> tuple[Path, str | None]:
    from huggingface_hub import HfApi, snapshot_download
    from tqdm.auto import tqdm

    class Reporting(tqdm):  # type: ignore[misc]
        """huggingface_hub's per-file bar, also told to ``progress`` (e.g. a Nextcloud init status)."""

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            if progress is not None and self.total:
                progress(min(1.0, self.n / self.total))
            return shown

    log.info("downloading %s into %s", repo, dest)
    try:
        revision = HfApi().model_info(repo).sha
        return Path(snapshot_download(
            repo, revision=revision, local_dir=dest, tqdm_class=Reporting,
            # "*/openvino_model.bin", not "*/*.bin": diffusers repos also hold pytorch .bin (and fp16) weight copies
            allow_patterns=["model_index.json", "manifest.json", "*/*.json", "*/*.txt", "*/*.onnx", "*/*.onnx_data",
                            "*/*.xml", "*/openvino_model.bin", "*/diffusion_pytorch_model.safetensors",
                            "*/model.safetensors"],
        )), revision
    except Exception as exc:  # offline, unknown repo, auth: all mean the weights cannot be had this way
        raise T2IError(_how_to_get(model, target, f"download of '{repo}' failed ({_reason(exc)})")) from None


def _reason(exc: Exception) -> str:
    """One readable line for why a hub request failed; the libraries' own texts run to several lines of URLs."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its licence on the hub and log in with `hf auth login`"
    if isinstance(exc, RepositoryNotFoundError):
        return "no such repository on the hub, or it is private and needs a token"
    if isinstance(exc, RevisionNotFoundError):
        return "the repository has no such revision"
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "Temporary failure in name resolution",
                   "timed out", "Network is unreachable"):
        if marker in text:
            return f"cannot reach the model hub at {constants.ENDPOINT}: {marker}"
    first_line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first_line[:200]}"


def _export(source: str, fmt: str, target: Path, say: Callable[[str], None], origin: dict | None = None) -> Path:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401

        from exporters.export import ExportError, export_model
    except ImportError:
        raise T2IError(
            f"model '{source}' must be exported first, which needs the export extra: "
            "pip install 'text2image-sd2[export]'; or export it elsewhere with "
            f"`text2image export {source} --format {fmt} --out DIR`, copy DIR here and pass --model DIR"
        ) from None
    try:
        return export_model(source, fmt, target, say=say, origin=origin)
    except ExportError as exc:
        raise T2IError(str(exc)) from None


def _how_to_get(model: str, target: Path, why: str) -> str:
    return (
        f"model '{model}' is not in the local store ({target}) and cannot be fetched: {why}. "
        f"On a machine with access run `text2image export {model} --out DIR`, copy DIR here and pass "
        "--model DIR (or put it at the store path above); to check the installation without a model, use "
        "--model tiny (a random test model)"
    )
