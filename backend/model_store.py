"""The local model store: turn ``--model`` (folder, short name, hub id, or tiny) into a bundle folder, downloading
and exporting when needed."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporters.tiny import TINY_MODELS
from runtime.errors import BundleError, ConfigError

log = logging.getLogger(__name__)

TINY_WARNING = (
    "WARNING: model 'tiny' is a RANDOM TEST MODEL built on this machine: its images are noise, not pictures. "
    "Use it to check the installation only."
)
_BUNDLE_FILES = ("unet/model.onnx", "unet/openvino_model.xml")


def _is_bundle(path: Path) -> bool:
    return (path / "model_index.json").is_file() and any((path / f).is_file() for f in _BUNDLE_FILES)


def _is_checkpoint(path: Path) -> bool:
    """A diffusers checkpoint folder: configs and weights, no exported graph."""
    return (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file() and not _is_bundle(path)


def _convert_folder(folder: Path, store: Path, fmt: str, say: Callable[[str], None],
                    progress: Callable[[float], None] | None) -> Path:
    """Convert a local diffusers checkpoint into the store once, as a hub checkpoint is: the bundle is
    ``<folder name>-<hash of its path>-<format>``, and a later start uses it without converting again."""
    import hashlib

    source = folder.resolve()
    target = store / f"{_slug(source.name)}-{hashlib.sha256(str(source).encode()).hexdigest()[:8]}-{fmt}"
    if _is_bundle(target) and (target / "manifest.json").is_file():
        return target
    say(f"converting the diffusers checkpoint in {folder} into the model store ({target})")
    return _export(str(source), fmt, target, say, progress=progress)


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

    A bundle folder is used as it is; a diffusers checkpoint folder is converted into the store. Otherwise the
    store is searched for ``<name>-<format>``; if it is not there, the model is fetched with huggingface_hub (an
    exported bundle is used directly, a diffusers checkpoint is converted: with torch where the export extra is
    installed, else through the graph templates). ``tiny`` is built locally.
    ``progress`` receives the fraction of the download and conversion done (0..1).
    """
    from backend.catalog import CATALOG

    local = Path(model).expanduser()
    # A known name (tiny, sd-turbo …) means that model even where the working directory has a folder of that name.
    named = model in TINY_MODELS or model in CATALOG
    if (local.is_dir() and not named) or model.startswith((".", "/", "~")):
        if not local.is_dir():
            raise ConfigError(f"model folder '{model}' does not exist")
        if _is_checkpoint(local):
            return _convert_folder(local, store, fmt, say, progress)
        return local
    target = store / f"{_slug(model)}-{fmt}"
    if _is_bundle(target) and (target / "manifest.json").is_file():
        return target
    downloaded = store / "downloads" / _slug(model)
    if _is_bundle(downloaded):  # a ready-made bundle fetched earlier: no need to ask the hub again
        return downloaded
    if model in TINY_MODELS:
        say(TINY_WARNING)
        return _export(model, fmt, target, say)
    from backend.catalog import lookup

    info = lookup(model)
    repo = info.source if info else model
    if "/" not in repo:
        raise ConfigError(
            f"model '{model}' is not a folder, a hub id (org/name), 'tiny', or a known model name; "
            "see `text2image info` for the known names"
        )
    if offline:
        raise BundleError(_how_to_get(model, target, "offline mode is on (T2I_OFFLINE)"))
    return _fetch(repo, downloaded, model, fmt, target, say, progress)


#: Of a first start's progress, the download's share when the checkpoint is converted afterwards.
DOWNLOAD_SHARE = 0.7


def _fetch(repo: str, dest: Path, model: str, fmt: str, target: Path, say: Callable[[str], None],
           progress: Callable[[float], None] | None) -> Path:
    """Download a hub repo into ``dest`` and, for a checkpoint, convert it into ``target``.

    For a checkpoint the configs come first and decide whether this environment can convert it at all, before any
    weight is asked for; then the room for the weights, the bundle and the conversion's scratch files is checked.
    Whatever fails leaves neither ``dest`` nor ``target`` behind.
    """
    from exporters.hub import HubError, check_room, fetch, list_repo

    report = progress or (lambda _: None)
    log.info("looking up %s on the model hub", repo)
    try:
        listing = list_repo(repo)
    except HubError:  # the repository answered, with a listing that is refused: its own message
        raise
    except Exception as exc:  # offline, unknown repo, auth: all mean the weights cannot be had this way
        raise BundleError(_how_to_get(model, target, f"download of '{repo}' failed ({_reason(exc)})")) from None
    try:
        if listing.is_bundle:
            files = listing.bundle_files()
            check_room(dest, sum(f.size for f in files), f"the bundle '{repo}'")
            log.info("downloading the bundle %s (%d files, %.2f GB) into %s", repo, len(files),
                     sum(f.size for f in files) / 1e9, dest)
            fetch(listing, files, dest, report)
            return dest
        fetch(listing, listing.checkpoint_small_files(), dest)
        converter = _converter_for(dest, model)
        weights = listing.checkpoint_weights()
        needed = conversion_bytes(weights, fmt)
        check_room(dest, needed, f"'{repo}' (download {sum(f.size for f in weights):,} bytes, then the bundle and "
                   "the conversion's scratch files)")
        log.info("downloading %s (%s; %.2f GB) into %s, then converting it with the %s converter", repo,
                 ", ".join(f.path for f in weights), sum(f.size for f in weights) / 1e9, dest, converter)
        fetch(listing, weights, dest, lambda f: report(DOWNLOAD_SHARE * f))
        bundle = _export(str(dest), fmt, target, say, origin={"id": repo, "revision": listing.revision, "kind": "hub"},
                         progress=lambda f: report(DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * f))
    except BaseException:
        _remove(dest)
        raise
    # The checkpoint is only the conversion's input; keeping it would hold the model twice on disk.
    _remove(dest)
    return bundle


def _remove(download: Path) -> None:
    """Delete a download folder, and the store's downloads/ folder when nothing else is in it."""
    shutil.rmtree(download, ignore_errors=True)
    try:
        download.parent.rmdir()
    except OSError:
        pass


def conversion_bytes(weights: list, fmt: str) -> int:
    """Disk a checkpoint's conversion needs: its weights, the fp32 bundle made from them, and the largest
    component's fp32 graph as scratch (OpenVINO IR is converted from a temporary ONNX graph)."""
    fp32 = [f.size * (2 if ".fp16." in f.path else 1) for f in weights]
    return sum(f.size for f in weights) + sum(fp32) + (max(fp32) if fmt == "openvino" else 0)


def _converter_for(checkpoint: Path, model: str) -> str:
    """The converter this environment would use on the checkpoint whose configs are in ``checkpoint``; raises
    HubError naming the reason when none can convert it (before any weight is downloaded)."""
    from exporters.checkpoint_files import check_checkpoint
    from exporters.export import ExportError, choose_converter
    from exporters.graph_template import TemplateError
    from exporters.hub import HubError

    check_checkpoint(checkpoint, weights=False)  # before minutes of download and conversion, not after
    try:
        converter = choose_converter("auto")
        if converter == "template":
            from exporters.convert import templates_for

            templates_for(checkpoint)
    except (ExportError, TemplateError) as exc:
        raise HubError(f"model '{model}' cannot be converted here: {exc}") from None
    return converter


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


def store_export(fmt: str, flags: frozenset[str] | None = None) -> dict[str, Any]:
    """How the store exports ``fmt`` (export_model's options), on a CPU with these flags (this machine's by default).

    OpenVINO: fp16-compressed weights (half the disk; OpenVINO computes in f32 or bf16 all the same), and the MatMul
    weights in int8 (:mod:`exporters.weight_int8`), decided per CPU from measurements on the full-size SD2.1:

    - 2-core AVX2 EPYC (OpenVINO computes in f32): fp16 made the first image come 1.6x sooner (less to read and
      convert) and the process peak 2.3 GB lower; int8 MatMuls in the text encoder and the UNet took 1.7 GB more off
      at the same speed. Both graphs are compressed.
    - 2-core Xeon with AMX (bf16): the int8 MatMuls cost speed, since the kernels decompress them at every call.
      Two models in one process, timed alternately and loaded in both orders (whichever loads second ran up to
      10 % faster here): the UNet step with its MatMul weights in fp16 was 0-15 % faster than in int8 at batch 1
      and 2 (7 % on average), one sd-turbo image (512², TAESD, PNG) 0.85 s against 0.88-0.96 s; peak 2.5 GB against
      2.2 GB (both graphs fp16: 2.8 GB). The UNet's stay fp16 there and the text encoder's int8: the peak stays
      under 60 % of the peers' (FastSD CPU's configuration: 4.3 GB), and the pixels are closer to fp32.

    A CPU with native bf16 but no AMX (AVX512-BF16 alone) was not measured and keeps both in int8. ONNX stays fp32
    (onnxruntime's CPU kernels are fp32). The pixels of each against the fp32 bundle are in
    tests/test_memory_levers.py."""
    if fmt != "openvino":
        return {"precision": "fp32"}
    from runtime.engines.openvino import has_amx

    return {"precision": "fp16", "int8_matmuls": ("text_encoder",) if has_amx(flags) else True}


def _export(source: str, fmt: str, target: Path, say: Callable[[str], None], origin: dict | None = None,
            progress: Callable[[float], None] | None = None) -> Path:
    try:
        from exporters.export import export_model
    except ImportError as exc:
        raise ConfigError(f"model '{source}' cannot be converted here: {exc.name} is missing (pip install "
                       f"'text2image-sd2[cpu]' brings the converter); or export it elsewhere with "
                       f"`text2image export {source} --format {fmt} --out DIR`, copy DIR here and pass --model DIR"
                       ) from None
    from backend.catalog import export_args

    _, defaults = export_args(origin["id"] if origin else source)
    options = store_export(fmt)
    if isinstance(options.get("int8_matmuls"), tuple):
        say(f"this CPU has AMX: int8 MatMul weights for {', '.join(options['int8_matmuls'])} only; the UNet's stay "
            "fp16 (in int8 they cost about 7 % per step on AMX)")
    try:
        return export_model(source, fmt, target, say=say, origin=origin, progress=progress, defaults=defaults,
                            **options)
    except Exception:  # whatever failed, no half-written bundle stays in the store (an interrupt keeps it to resume)
        shutil.rmtree(target, ignore_errors=True)
        raise


def _how_to_get(model: str, target: Path, why: str) -> str:
    return (
        f"model '{model}' is not in the local store ({target}) and cannot be fetched: {why}. "
        f"On a machine with access run `text2image export {model} --out DIR`, copy DIR here and pass "
        "--model DIR (or put it at the store path above); to check the installation without a model, use "
        "--model tiny (a random test model)"
    )
