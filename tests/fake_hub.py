"""A small fake of the Hugging Face Hub's HTTP API on 127.0.0.1, serving model repos made from local folders.

It answers the calls huggingface_hub (0.3x, plain HTTP, no Xet) makes for ``HfApi.model_info`` / ``repo_info``,
``list_repo_tree`` and ``snapshot_download`` / ``hf_hub_download`` the way huggingface.co answers them, headers
included, so the real client runs unchanged against it; every request is recorded so tests can assert what was
fetched. What it mimics:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: the model info JSON (``id``, ``sha``,
  ``siblings`` …); ``GET /api/models/{repo}/tree/{rev}[/{path}][?recursive=true]``: the file listing.
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: small (git) files answer 200 with ``ETag`` (the git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; LFS files (weights, graphs) answer 302 to a "CDN" URL with
  ``X-Linked-Etag`` (their sha256), ``X-Linked-Size`` and ``X-Repo-Commit``, like the hub does; ``Range`` works.
* Errors carry the hub's ``X-Error-Code``: an unknown repo is ``RepoNotFound`` (401 without a token, 404 with one,
  since the hub will not confirm that a private repo exists), then ``RevisionNotFound`` and ``EntryNotFound``.

A hostile repo, for tests: :meth:`FakeHub.add_files` publishes any file names (``..`` parts, absolute paths …),
listing sizes that differ from the bytes served (``announced``) and listed files that answer 404 (``missing``).

Faults a real network gives, for tests: ``faults[(repo, path)]`` lists what the next bodies of that file suffer,
one entry per body sent: ``"cut"`` closes the connection halfway through, ``"corrupt"`` flips a byte, ``"grow"``
sends 1 MB more than the listing and the HEAD answer announced (a hostile hub).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".bin", ".ckpt", ".h5", ".msgpack", ".onnx", ".onnx_data", ".pt", ".pth", ".safetensors")
LFS_MIN_SIZE = 10 * 1024 * 1024  # the hub stores any file this large in LFS
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
DATE = "2024-01-02T03:04:05.000Z"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo as the hub sees it: git blob id, and an LFS sha256 for large or binary files."""

    path: str
    data: bytes

    @property
    def sha256(self) -> str | None:
        if self.path.endswith(LFS_SUFFIXES) or len(self.data) >= LFS_MIN_SIZE:
            return hashlib.sha256(self.data).hexdigest()
        return None

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def blob_id(self) -> str:
        return _git_blob_id(self.pointer if self.sha256 else self.data)

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": self.path}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass(frozen=True)
class Repo:
    """A model repo with one commit on ``main``; ``sha`` is that commit."""

    repo_id: str
    files: dict[str, RepoFile]
    sha: str
    announced: dict[str, int] = field(default_factory=dict)  # path → the size the listing gives instead
    missing: frozenset[str] = frozenset()  # listed paths whose download answers 404

    def info(self, blobs: bool = False) -> dict:
        """The model info JSON; ``blobs`` (``?blobs=true``, files_metadata) adds each file's size, blob id, LFS."""
        siblings = [{"rfilename": p} for p in sorted(self.files)]
        if blobs:
            for sibling in siblings:
                file = self.files[sibling["rfilename"]]
                size = self.announced.get(file.path, len(file.data))
                sibling.update(size=size, blobId=file.blob_id)
                if file.sha256:  # named "sha256" here, "oid" in the tree listing, as on the hub
                    sibling["lfs"] = {"sha256": file.sha256, "size": size, "pointerSize": len(file.pointer)}
        return {
            "_id": hashlib.sha1(self.repo_id.encode()).hexdigest()[:24], "id": self.repo_id, "modelId": self.repo_id,
            "author": self.repo_id.split("/")[0], "sha": self.sha, "lastModified": DATE, "createdAt": DATE,
            "private": False, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "library_name": "diffusers", "tags": ["diffusers", "text-to-image"], "pipeline_tag": "text-to-image",
            "spaces": [], "siblings": siblings,
            "usedStorage": sum(len(f.data) for f in self.files.values()),
        }


class FakeHub:
    """The fake hub: ``add_repo`` folders, ``start()``, point ``HF_ENDPOINT`` at ``url``, read ``requests``."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD /path?query", in arrival order
        self.sent: list[tuple[str, str]] = []  # (repo id, file path) for each file body served
        self.faults: dict[tuple[str, str], list[str]] = {}
        self.ranges: list[tuple[str, str, int]] = []  # (repo id, file path, first byte) of each Range request
        #: URL path → (repo id, file path) for listed names with '..' parts: the client's HTTP stack removes the dot
        #: segments from the URL, and a hostile hub answers the URL it is sent.
        self.stray: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def add_repo(self, repo_id: str, folder: Path) -> Repo:
        """Publish every file under ``folder`` (plus the ``.gitattributes`` every hub repo has) as ``repo_id``."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        return self.add_files(repo_id, files)

    def add_files(self, repo_id: str, files: dict[str, bytes], announced: dict[str, int] | None = None,
                  missing: Iterable[str] = ()) -> Repo:
        """Publish ``files`` (path → bytes, any path the test likes) as ``repo_id``; the listing gives the sizes in
        ``announced`` instead of the real ones, and the paths in ``missing`` are listed but answer 404."""
        files = {**files}
        files.setdefault(".gitattributes", GITATTRIBUTES)
        repo_files = {path: RepoFile(path, data) for path, data in files.items()}
        tree = "".join(f"{f.blob_id} {p}\n" for p, f in sorted(repo_files.items()))
        repo = Repo(repo_id, repo_files, hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest(),
                    dict(announced or {}), frozenset(missing))
        self.repos[repo_id] = repo
        for path in files:
            if ".." in path.split("/"):
                self.stray[posixpath.normpath(f"/{repo_id}/resolve/{repo.sha}/{path}")] = (repo_id, path)
        return repo

    @property
    def port(self) -> int:
        assert self._server is not None, "the fake hub is not running"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:  # once: a test may stop it before teardown
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
        self._thread = None

    def record(self, line: str | None, sent: tuple[str, str] | None = None) -> None:
        with self._lock:
            if line is not None:
                self.requests.append(line)
            if sent is not None:
                self.sent.append(sent)

    def files_sent(self, repo_id: str) -> list[str]:
        """Paths of the files of ``repo_id`` whose contents were downloaded, sorted."""
        return sorted(path for rid, path in self.sent if rid == repo_id)


_REPO = r"(?P<repo>[^/?]+/[^/?]+)"
_ROUTES = (
    ("info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("tree", re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("cdn", re.compile(rf"^/cdn-lfs/{_REPO}/(?P<oid>[0-9a-f]{{64}})$")),
)


class _Error(Exception):
    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-hub"
    hub: FakeHub

    def log_message(self, format: str, *args: object) -> None:  # quiet: the test output is ours
        pass

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    def _dispatch(self, send_body: bool) -> None:
        self.hub.record(f"{self.command} {self.path}")
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        try:
            for kind, pattern in _ROUTES:
                match = pattern.match(split.path)
                if match:
                    groups = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, f"_{kind}")(send_body, query, **groups)
                    return
            stray = self.hub.stray.get(unquote(split.path))
            if stray is not None:
                self._resolve(send_body, query, repo=stray[0], rev="main", path=stray[1])
                return
            raise _Error(404, None, "Not Found")
        except _Error as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, json.dumps({"error": err.message}).encode(), headers, send_body)

    def _repo(self, repo_id: str, rev: str | None = None) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            if self.headers.get("Authorization"):
                raise _Error(404, "RepoNotFound", "Repository not found")
            raise _Error(401, "RepoNotFound", "Invalid username or password.")
        if rev is not None and rev not in ("main", repo.sha):
            raise _Error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return repo

    def _info(self, send_body: bool, query: dict[str, str], repo: str, rev: str | None) -> None:
        found = self._repo(repo, rev)
        blobs = query.get("blobs", "").lower() in ("1", "true")
        self._send(200, json.dumps(found.info(blobs)).encode(), {"Content-Type": "application/json"}, send_body)

    def _tree(self, send_body: bool, query: dict[str, str], repo: str, rev: str, path: str | None) -> None:
        found = self._repo(repo, rev)
        base = (path or "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = query.get("recursive", "").lower() in ("1", "true")
        entries: dict[str, dict] = {}
        for file in found.files.values():
            if not file.path.startswith(prefix):
                continue
            parts = file.path[len(prefix):].split("/")
            for depth in range(1, len(parts)):  # the folders on the way, as the hub lists them
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": _git_blob_id(folder.encode()),
                                                "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                entries[file.path] = file.tree_entry()
        if base and not entries:
            raise _Error(404, "EntryNotFound", f"{base} does not exist on \"main\"")
        body = json.dumps([entries[k] for k in sorted(entries)]).encode()
        self._send(200, body, {"Content-Type": "application/json"}, send_body)

    def _resolve(self, send_body: bool, query: dict[str, str], repo: str, rev: str, path: str) -> None:
        found = self._repo(repo, rev)
        commit = {"X-Repo-Commit": found.sha}
        file = found.files.get(path)
        if file is None or path in found.missing:
            raise _Error(404, "EntryNotFound", "Entry not found", commit)
        if file.sha256:  # LFS: the hub redirects to its CDN and names the real blob in X-Linked-* headers
            location = f"http://{self.headers.get('Host')}/cdn-lfs/{found.repo_id}/{file.sha256}?path={quote(path)}"
            body = f"Found. Redirecting to {location}".encode()
            self._send(302, body, {**commit, "Location": location, "ETag": f'"{file.blob_id}"',
                                   "X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(len(file.data)),
                                   "Content-Type": "text/plain; charset=utf-8"}, send_body)
            return
        self._send_file(found, file, {**commit, "ETag": f'"{file.blob_id}"'}, send_body)

    def _cdn(self, send_body: bool, query: dict[str, str], repo: str, oid: str) -> None:
        found = self.hub.repos.get(repo)
        file = found.files.get(query.get("path", "")) if found else None  # the real CDN URL is signed instead
        if found is None or file is None or file.sha256 != oid:
            raise _Error(403, None, "AccessDenied")
        self._send_file(found, file, {"ETag": f'"{oid}"'}, send_body)

    def _send_file(self, repo: Repo, file: RepoFile, headers: dict[str, str], send_body: bool) -> None:
        data, status = file.data, 200
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted:
            start = int(wanted[1])
            end = min(int(wanted[2]) if wanted[2] else len(data) - 1, len(data) - 1)
            if start >= len(data):
                raise _Error(416, None, "Range Not Satisfiable", {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            with self.hub._lock:
                self.hub.ranges.append((repo.repo_id, file.path, start))
            data, status = data[start:end + 1], 206
        fault = None
        if send_body:
            self.hub.record(None, sent=(repo.repo_id, file.path))
            with self.hub._lock:
                queued = self.hub.faults.get((repo.repo_id, file.path))
                fault = queued.pop(0) if queued else None
        if fault == "grow":
            data += b"\0" * (1 << 20)
        if fault == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if fault == "cut":
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self._send(status, data, headers, send_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        trace = self.headers.get("X-Amzn-Trace-Id") or str(uuid.uuid4())
        for key, value in {"X-Request-Id": trace, **headers, "Content-Length": str(len(body))}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)


#: What a checkpoint download may fetch from a repo laid out by :func:`sd2_layout`: configs, tokenizer and one
#: weight file per component, the fp16 variant.
CHECKPOINT_NEEDED = [
    "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
    "text_encoder/model.fp16.safetensors", "tokenizer/merges.txt", "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
    "unet/diffusion_pytorch_model.fp16.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.fp16.safetensors",
]


def sd2_layout(checkpoint: Path, folder: Path) -> Path:
    """A diffusers checkpoint laid out like the real SD2 repos: fp32 and fp16 safetensors, pickled copies, a
    single-file checkpoint, an EMA copy and a README beside them."""
    import shutil

    from safetensors.numpy import load_file, save_file

    folder = Path(shutil.copytree(checkpoint, folder))
    for weights in list(folder.glob("*/*.safetensors")):
        save_file({k: v.astype("float16") for k, v in load_file(str(weights)).items()},
                  str(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors"))))
    for name in ["sd_tiny.ckpt", "sd_tiny-ema.safetensors", "README.md", "unet/diffusion_pytorch_model.bin",
                 "text_encoder/pytorch_model.bin", "text_encoder/pytorch_model.fp16.bin"]:
        (folder / name).write_bytes(f"{name}: another copy of the weights that the conversion does not read\n".encode())
    return folder
