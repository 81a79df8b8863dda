"""Fetching a model repository from the hub: the file list first, then only the files a bundle is made of, after
checking that the disk has room for them, each checked against the hub's sha256 once it is here.

A repository is either a ready bundle (``unet/model.onnx`` or ``unet/openvino_model.xml``; every graph and config
is fetched) or a diffusers checkpoint, of which only the configs, the tokenizer and one safetensors file per
component are fetched: the ``fp16`` variant where the repository has one (half the bytes; the converter makes the
same fp32 graph from it), never the ``.bin`` / ``.ckpt`` copies or the EMA and single-file weights beside them.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from exporters.graph_template import CHECKPOINT_FOLDERS
from runtime.bundle import MAX_JSON_BYTES, file_digest
from runtime.errors import T2IError, quoted

log = logging.getLogger(__name__)

BUNDLE_MARKERS = ("unet/model.onnx", "unet/openvino_model.xml")
#: A checkpoint's small files: what decides whether and how it converts, and what the bundle copies as it is.
CHECKPOINT_FILES = ("model_index.json", "scheduler/scheduler_config.json")
CHECKPOINT_FOLDERS_COPIED = ("tokenizer/",)
BUNDLE_SUFFIXES = (".json", ".txt", ".onnx", ".onnx_data", ".xml")
#: Where a file being downloaded grows, inside the download folder, until it is whole.
PARTIAL = ".partial"


class HubError(T2IError, RuntimeError):
    """The repository cannot be fetched as asked; the message says why."""


def check_name(repo: str, name: str) -> None:
    """Refuse a listed file name that could write outside the download folder or is not a plain relative path:
    a ``..`` part, a leading ``/``, a backslash, NUL or another control character, an empty part."""
    parts = name.split("/")
    bad = ("is empty" if not name
           else "starts with '/'" if name.startswith("/")
           else "has a '..' part" if ".." in parts
           else "holds a backslash" if "\\" in name
           else "holds a control character" if any(ord(c) < 32 or ord(c) == 127 for c in name)
           else "has an empty or '.' part" if any(p in ("", ".") for p in parts)
           else f"lies in {PARTIAL}/, where downloads grow" if parts[0] == PARTIAL
           else None)
    if bad:
        raise HubError(f"'{repo}' lists the file {quoted(name, 200)}, which {bad}; a repository file name must be a "
                       "plain relative path, so this repository is not downloaded")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository: its path, size and (for LFS files) the sha256 the hub publishes."""

    path: str
    size: int
    sha256: str | None = None


@dataclass(frozen=True)
class Listing:
    """A repository at one commit."""

    repo: str
    revision: str
    files: dict[str, RemoteFile]

    @property
    def is_bundle(self) -> bool:
        return any(m in self.files for m in BUNDLE_MARKERS)

    def bundle_files(self) -> list[RemoteFile]:
        """Every file of a ready bundle: graphs, their weights, configs and tokenizer."""
        return self._capped([f for p, f in sorted(self.files.items())
                             if "/" in p or p in ("model_index.json", "manifest.json")
                             if p.endswith(BUNDLE_SUFFIXES) or p.endswith("/openvino_model.bin")])

    def _capped(self, files: list[RemoteFile]) -> list[RemoteFile]:
        """``files``, refused when a JSON file among them is announced larger than any config is."""
        for f in files:
            if f.path.endswith(".json") and f.size > MAX_JSON_BYTES:
                raise HubError(f"'{self.repo}' lists {quoted(f.path)} at {f.size:,} bytes; a config file is at most "
                               f"{MAX_JSON_BYTES:,} bytes, so it is not downloaded")
        return files

    def checkpoint_small_files(self) -> list[RemoteFile]:
        """A checkpoint's configs and tokenizer files: all the converter needs to decide, and a few kB."""
        wanted = {f"{folder}/config.json" for folder, _ in CHECKPOINT_FOLDERS.values()} | set(CHECKPOINT_FILES)
        found = [f for p, f in sorted(self.files.items())
                 if p in wanted or (p.startswith(CHECKPOINT_FOLDERS_COPIED) and p.endswith((".json", ".txt")))]
        missing = sorted(wanted - {f.path for f in found})
        if missing:
            raise HubError(f"'{self.repo}' is neither a bundle nor an SD2-family diffusers checkpoint: it has no "
                           f"{', '.join(missing)}")
        return self._capped(found)

    def checkpoint_weights(self) -> list[RemoteFile]:
        """One safetensors file per component, the fp16 variant where there is one."""
        chosen = []
        for folder, stem in CHECKPOINT_FOLDERS.values():
            for name in (f"{stem}.fp16.safetensors", f"{stem}.safetensors"):
                if f"{folder}/{name}" in self.files:
                    chosen.append(self.files[f"{folder}/{name}"])
                    break
            else:
                others = [p for p in self.files if p.startswith(f"{folder}/") and not p.endswith(".json")]
                shown = quoted(", ".join(sorted(others)), 300) if others else "no weights"
                raise HubError(f"'{self.repo}' has no {folder}/{stem}.safetensors (nor its fp16 variant); found "
                               f"{shown}. Pickled .bin/.ckpt weights are not read")
        return chosen


def list_repo(repo: str) -> Listing:
    """The repository's newest commit and its files with sizes and sha256 (one API call). A repository that lists
    a file name which is not a plain relative path (see :func:`check_name`) is refused before anything is
    downloaded."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True)
    files = {}
    for s in info.siblings or []:
        check_name(repo, s.rfilename)
        lfs = getattr(s, "lfs", None)
        sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = s.size or 0
        if not isinstance(size, int) or size < 0:
            raise HubError(f"'{repo}' lists {quoted(s.rfilename)} with the size {quoted(size)}; not a byte count")
        files[s.rfilename] = RemoteFile(s.rfilename, size, sha)
    if info.sha is None:
        raise HubError(f"the hub gave no commit for '{repo}'")
    return Listing(repo, info.sha, files)


def free_bytes(folder: Path) -> int:
    """Free space on the disk that holds ``folder`` (or the nearest existing folder above it)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def check_room(folder: Path, needed: int, what: str) -> None:
    """Fail before writing anything when the disk under ``folder`` has less than ``needed`` bytes free."""
    free = free_bytes(folder)
    if free < needed:
        raise HubError(f"not enough free disk space in {folder} for {what}: needs {needed:,} bytes "
                       f"({needed / 1e9:.2f} GB), {free:,} bytes ({free / 1e9:.2f} GB) are free")


def _disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


#: Tries per file when the connection breaks; each one resumes where the last stopped.
TRIES = 4


def _download(listing: Listing, file: RemoteFile, dest: Path, fresh: bool) -> Path:
    """One file into ``dest``; a broken connection is tried again from the bytes already here (a Range request
    for the rest).

    The hub's answer to a HEAD request must announce the size the listing gave before any byte is fetched, and the
    body is read only up to that size: a hub that sends more is cut off there, so a file never takes more room
    than the room check and the progress counted on."""
    import requests
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    where = f"{quoted(file.path)} from '{listing.repo}'"
    url = hf_hub_url(listing.repo, file.path, revision=listing.revision)
    part = dest / PARTIAL / file.path
    if fresh:
        part.unlink(missing_ok=True)
    for attempt in range(1, TRIES + 1):
        try:
            served = get_hf_file_metadata(url).size
            if served != file.size:
                says = "no size" if served is None else f"{served:,} bytes"
                raise HubError(f"{where} is listed at {file.size:,} bytes but the hub announces {says}; it is not "
                               "downloaded")
            _receive(url, part, file.size, where)
            target = dest / file.path
            target.parent.mkdir(parents=True, exist_ok=True)
            part.replace(target)
            return target
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, requests.Timeout) as exc:
            if attempt == TRIES:
                raise HubError(f"downloading {where} broke off {TRIES} times ({type(exc).__name__}); run again to "
                               "resume it") from None
            log.warning("download of %s broke off (%s); resuming", file.path, type(exc).__name__)
        except HubError:
            raise
        except (OSError, ValueError) as exc:  # 404 for a listed file, a body that is not the announced size …
            status = getattr(getattr(exc, "response", None), "status_code", None)
            why = f"the hub answers {status}" if status else quoted(str(exc).splitlines()[0] if str(exc) else "", 200)
            raise HubError(f"{where} cannot be downloaded: {why} ({type(exc).__name__})") from None
    raise AssertionError("unreachable")


def _receive(url: str, part: Path, size: int, where: str) -> None:
    """Append the bytes of ``url`` that ``part`` lacks, never more than ``size`` in all."""
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have == size and size > 0:
        return
    headers = build_hf_headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    with get_session().get(url, headers=headers, stream=True, timeout=(10, 60)) as answer:
        if have and answer.status_code == 416:  # the bytes here are not a start the server knows: start again
            part.unlink()
            return _receive(url, part, size, where)
        hf_raise_for_status(answer)
        if have and (answer.status_code != 206
                     or not answer.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
            have = 0  # the server ignored the Range, or answered another one: start again
        with part.open("ab" if have else "wb") as out:
            for chunk in answer.iter_content(1 << 20):
                if have + len(chunk) > size:
                    raise HubError(f"{where} sends more than the {size:,} bytes it announced; the download was "
                                   "stopped there and the file is not used")
                out.write(chunk)
                have += len(chunk)
    if have != size:
        raise HubError(f"{where} has {have:,} bytes, the hub announced {size:,}; it is not used")


def fetch(listing: Listing, files: Iterable[RemoteFile], dest: Path,
          progress: Callable[[float], None] | None = None) -> None:
    """Download ``files`` into ``dest`` (a partial file from an interrupted run resumes where it stopped), check
    each LFS file against the hub's sha256 and fetch a mismatching one once more; ``progress`` gets the fraction
    of the bytes that are here."""
    files = list(files)
    total = sum(f.size for f in files) or 1
    done = 0
    stop = threading.Event()
    base = _disk_bytes(dest) if dest.exists() else 0

    shown = 0.0

    def watch() -> None:  # the growing files on disk tell
        nonlocal shown
        while not stop.wait(0.5):
            fraction = min(1.0, max(done, _disk_bytes(dest) - base) / total)
            if progress is not None and fraction > shown:
                shown = fraction
                progress(fraction)

    watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
    watcher.start()
    try:
        inside = dest.resolve()
        for file in files:
            check_name(listing.repo, file.path)
            if not all((dest / folder / file.path).resolve().is_relative_to(inside) for folder in ("", PARTIAL)):
                # a link planted in the download folder
                raise HubError(f"{quoted(file.path)} from '{listing.repo}' would be written outside {dest}")
            for attempt in (1, 2):
                path = _download(listing, file, dest, fresh=attempt > 1)
                if file.sha256 is None or file_digest(path) == file.sha256:
                    break
                path.unlink()
                if attempt == 2:
                    raise HubError(f"{file.path} from '{listing.repo}' does not match the hub's sha256 "
                                   f"{file.sha256} twice; the download is corrupted on the way")
            done += file.size
    finally:
        stop.set()
        watcher.join()
    shutil.rmtree(dest / PARTIAL, ignore_errors=True)  # empty folders once every file is whole
    if progress is not None and shown < 1.0:
        progress(1.0)
