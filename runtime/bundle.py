"""A model bundle on disk: optimum's folder layout plus our optional ``manifest.json``.

Everything the runtime needs to know about a model is read here from the bundle's own files: which format the graphs
are in, the scheduler config (prediction type, betas, spacing), the VAE's scaling factor and upsampling factor, and
the static shapes and defaults the exporter recorded. Nothing is assumed from the model's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from runtime.errors import BundleError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
GRAPH_FOLDERS = ("text_encoder", "unet", "vae_decoder")
GRAPH_FILES: dict[str, str] = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}

Format = Literal["onnx", "openvino"]


#: Larger config or manifest files are refused rather than read whole (a real manifest is a few kB).
MAX_JSON_BYTES = 4 * 1024 * 1024


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise BundleError(f"bundle file {path} is over {MAX_JSON_BYTES // (1024 * 1024)} MB; no config is this "
                              "large, so it is not read")
        data = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(f"bundle file {path} is missing") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested thousands deep
        raise BundleError(f"bundle file {path} cannot be read as JSON: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise BundleError(f"bundle file {path} must hold a JSON object, found {type(data).__name__}")
    return data


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, read in chunks so multi-GB weights do not need the memory."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated view of a bundle folder. Build it with :meth:`Bundle.open`."""

    path: Path
    format: Format
    scheduler_config: dict[str, Any]
    vae_config: dict[str, Any]
    unet_config: dict[str, Any]
    manifest: dict[str, Any] | None = None
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Open the bundle at ``path``; check its layout and, when it has a manifest, every file's size."""
        root = Path(path).expanduser()
        if not root.is_dir():
            raise BundleError(f"model bundle '{root}' is not a folder")
        if not (root / "model_index.json").is_file():
            raise BundleError(
                f"'{root}' is not a model bundle: model_index.json is missing "
                "(export one with `text2image export SOURCE --out DIR`)"
            )
        cls._check_links(root)  # before any file of the bundle is read
        fmt = cls._detect_format(root)
        manifest = _read_json(root / MANIFEST) if (root / MANIFEST).is_file() else None
        files: dict[str, dict[str, Any]] = {}
        if manifest is not None:
            if manifest.get("format_version") != MANIFEST_VERSION:
                raise BundleError(
                    f"{root / MANIFEST} has format_version {manifest.get('format_version')!r}; "
                    f"this runtime reads version {MANIFEST_VERSION}"
                )
            if manifest.get("format") != fmt:
                raise BundleError(f"{root / MANIFEST} says format {manifest.get('format')!r} but the graphs are {fmt}")
            files = cls._listed_files(root, manifest.get("files", {}))
            cls._check_sizes(root, files)
        for component in GRAPH_FOLDERS:
            graph = root / component / GRAPH_FILES[fmt]
            if not graph.is_file():
                raise BundleError(f"bundle '{root}' is missing {component}/{GRAPH_FILES[fmt]}")
            if fmt == "openvino" and not graph.with_suffix(".bin").is_file():
                raise BundleError(f"bundle '{root}' is missing {component}/{graph.with_suffix('.bin').name}")
        return cls(
            path=root,
            format=fmt,
            scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
            vae_config=_read_json(root / "vae_decoder" / "config.json"),
            unet_config=_read_json(root / "unet" / "config.json"),
            manifest=manifest,
            files=files,
        )

    @staticmethod
    def _detect_format(root: Path) -> Format:
        found = [fmt for fmt, name in GRAPH_FILES.items() if (root / "unet" / name).is_file()]
        if not found:
            raise BundleError(
                f"bundle '{root}' has no UNet graph: expected unet/model.onnx (ONNX) or unet/openvino_model.xml "
                "(OpenVINO IR)"
            )
        if len(found) > 1:
            raise BundleError(f"bundle '{root}' holds both ONNX and OpenVINO graphs; keep one format per folder")
        return found[0]  # type: ignore[return-value]

    @staticmethod
    def _check_links(root: Path) -> None:
        """Refuse a link anywhere in the bundle, listed in the manifest or not, that leads out of it: the loader
        and `verify` must read the bundle's own files only."""
        inside = root.resolve()
        for folder, dirs, names in os.walk(root):  # os.walk does not descend into linked folders
            for name in (*dirs, *names):
                path = Path(folder) / name
                if path.is_symlink() and not path.resolve().is_relative_to(inside):
                    raise BundleError(f"bundle '{root}' holds {path.relative_to(root).as_posix()[:200]!r}, a link to "
                                      "outside the bundle; a bundle's files must be its own")

    @staticmethod
    def _listed_files(root: Path, files: object) -> dict[str, dict[str, Any]]:
        """The manifest's file list, each entry a path that stays inside the bundle (no '..', no absolute path,
        no link out of it): a manifest must not make the loader or `verify` read other files."""
        if not isinstance(files, dict):
            raise BundleError(f"{root / MANIFEST}: 'files' must be an object of path → size and sha256")
        inside = root.resolve()
        for rel, meta in files.items():
            target = (root / rel).resolve()
            if (not isinstance(meta, dict) or Path(rel).is_absolute() or ".." in Path(rel).parts
                    or not target.is_relative_to(inside)):
                raise BundleError(f"{root / MANIFEST} lists {str(rel)[:100]!r}, which is not a file inside the "
                                  "bundle; the manifest is damaged or was made to read other files")
        return files

    @staticmethod
    def _check_sizes(root: Path, files: dict[str, dict[str, Any]]) -> None:
        for rel, meta in files.items():
            p = root / rel
            if not p.is_file():
                raise BundleError(f"bundle '{root}' is missing {rel} (listed in {MANIFEST}); re-export or "
                                  "re-download it")
            size = p.stat().st_size
            if size != meta.get("size"):
                raise BundleError(
                    f"bundle file {rel} has {size} bytes but {MANIFEST} lists {meta.get('size')}: "
                    "the file is truncated or was changed; re-export or re-download it"
                )

    def verify_hashes(self, progress: Callable[[float], None] | None = None) -> list[str]:
        """Compare every file's sha256 with the manifest; return the files that differ (empty: all good).
        ``progress`` gets the fraction of the bytes checked."""
        if self.manifest is None:
            raise BundleError(f"bundle '{self.path}' has no {MANIFEST}, so there is nothing to verify against")
        total = sum(int(meta.get("size") or 0) for meta in self.files.values()) or 1
        done, bad = 0, []
        for rel, meta in self.files.items():
            if file_digest(self.path / rel) != meta.get("sha256"):
                bad.append(rel)
            done += int(meta.get("size") or 0)
            if progress is not None:
                progress(done / total)
        return bad

    @property
    def source_id(self) -> str:
        """Where the model came from (the manifest's source id: a hub id, 'tiny' …), else the folder's name."""
        return str(((self.manifest or {}).get("source") or {}).get("id") or self.path.name)

    def has(self, component: str) -> bool:
        """Whether an optional component (e.g. ``taesd_decoder``) is in the bundle."""
        return self.graph(component).is_file()

    def component_config(self, component: str) -> dict[str, Any]:
        """A component's config.json."""
        return _read_json(self.path / component / "config.json")

    def graph(self, component: str) -> Path:
        """Path of a component's graph file in this bundle's format."""
        return self.path / component / GRAPH_FILES[self.format]

    @property
    def precision(self) -> str:
        """The precision the exporter wrote (fp32, fp16, int8 …); plain optimum folders count as fp32."""
        return str((self.manifest or {}).get("precision", "fp32"))

    @property
    def weights(self) -> str:
        """How the weights are stored, for logs and `info`: the precision, and the graphs whose MatMul weights the
        exporter stored in int8."""
        int8 = sorted((self.manifest or {}).get("weights") or {})
        return f"{self.precision} (int8 MatMuls: {', '.join(int8)})" if int8 else self.precision

    @property
    def fusions(self) -> str:
        """onnxruntime graph fusions applied at export: none, cpu, or cuda (runs on the CUDA provider only)."""
        return str(((self.manifest or {}).get("request") or {}).get("fusions", "none"))

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 ** (number of VAE blocks - 1), 8 for SD2; for a TAESD decoder
        (SDXS) its upsampling factor between each two of its decoder levels."""
        config = self.vae_config
        if isinstance(config.get("decoder_block_out_channels"), list):
            return int(config.get("upsampling_scaling_factor", 2)) ** (len(config["decoder_block_out_channels"]) - 1)
        return int(2 ** (len(config.get("block_out_channels", [0, 0, 0, 0])) - 1))

    @property
    def vae_scaling_factor(self) -> float:
        """The factor latents were scaled by in training (0.18215 for SD2), from the VAE config."""
        if "scaling_factor" not in self.vae_config:
            raise BundleError(f"{self.path / 'vae_decoder' / 'config.json'} has no scaling_factor")
        try:
            return float(self.vae_config["scaling_factor"])
        except (TypeError, ValueError):
            raise BundleError(f"{self.path / 'vae_decoder' / 'config.json'}: scaling_factor "
                              f"{str(self.vae_config['scaling_factor'])[:40]!r} is not a number") from None

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config.get("in_channels", self.vae_config.get("latent_channels", 4)))

    @property
    def static_shape(self) -> dict[str, int] | None:
        """Height, width and batch the graphs were fixed to at export, or None for dynamic graphs."""
        shape = (self.manifest or {}).get("static_shape")
        return dict(shape) if shape else None

    @property
    def defaults(self) -> dict[str, Any]:
        """Per-model generation defaults recorded by the exporter (steps, guidance, size), possibly empty."""
        return dict((self.manifest or {}).get("defaults") or {})

    @property
    def native_size(self) -> int:
        """The side length the model was trained at: UNet sample_size × VAE factor (512 for sd2.1-base)."""
        return int(self.unet_config.get("sample_size", 64)) * self.vae_scale_factor

    def summary(self) -> dict[str, Any]:
        """A short description for `text2image info`."""
        m = self.manifest or {}
        return {
            "path": str(self.path),
            "format": self.format,
            "precision": self.precision,
            "weights": self.weights,
            "fusions": self.fusions,
            "source": m.get("source", {}).get("id", "unknown (plain optimum folder)"),
            "prediction_type": self.scheduler_config.get("prediction_type", "epsilon"),
            "scheduler": self.scheduler_config.get("_class_name", "?"),
            "native_size": self.native_size,
            "static_shape": self.static_shape,
            "manifest": m != {},
            "size_bytes": sum(int(v.get("size", 0)) for v in self.files.values()) or None,
        }
