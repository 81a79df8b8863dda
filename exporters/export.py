"""SOURCE (hub id, local diffusers folder, or ``tiny``) → a checked bundle folder with manifest.json."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from exporters.check import ExportCheckError, check_component
from exporters.checkpoint_files import check_checkpoint
from exporters.contract import COMPONENTS, CONVERTERS, FORMATS, PRECISIONS
from exporters.convert import finish_graph, write_model_index
from exporters.tiny import TINY_MODELS
from runtime.bundle import MANIFEST, MANIFEST_VERSION, file_digest
from runtime.errors import T2IError, quoted

log = logging.getLogger(__name__)

STATE = ".export-state.json"
EXPORTER_VERSION = "0.1.0"


class ExportError(T2IError, RuntimeError):
    """Export cannot proceed; the message says why and what to do."""


def resolve_source(source: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """A local diffusers folder for SOURCE, and what to record about its origin."""
    if source in TINY_MODELS:
        if not torch_available():
            raise ExportError(f"'{source}' is a random model built with torch, which needs the export extra "
                              "(pip install 'text2image-sd2[export]'); without it, point at a diffusers folder or "
                              "a bundle")
        from exporters.tiny import build_tiny_model, build_tiny_sdxs_model

        path = (build_tiny_sdxs_model(workdir / source) if source == "tiny-sdxs"
                else build_tiny_model(workdir / source, variant="v" if source == "tiny-v" else "epsilon"))
        return path, {"id": source, "revision": None, "kind": "tiny random test model"}
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise ExportError(f"source folder '{local}' has no model_index.json; it is not a diffusers model folder")
        return local, {"id": str(local.resolve()), "revision": None, "kind": "local folder"}
    repo = source
    if "/" not in repo:
        raise ExportError(f"source '{source}' is not a folder, a hub id (org/name) or 'tiny'")
    from exporters.hub import HubError, fetch, list_repo

    try:
        listing = list_repo(repo)
        if listing.is_bundle:
            raise ExportError(f"'{repo}' is already a bundle; use it with `text2image generate --model {repo}`")
        path = workdir / "checkpoint"
        fetch(listing, [*listing.checkpoint_small_files(), *listing.checkpoint_weights()], path)
        revision = listing.revision
    except ExportError:
        raise
    except HubError as exc:
        raise ExportError(str(exc)) from None
    except Exception as exc:  # network, auth and missing-repo errors all mean: cannot get the weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"could not download '{repo}' from the model hub: {type(exc).__name__} "
                          f"{quoted(first, 200)}") from None
    return path, {"id": repo, "revision": revision, "kind": "hub"}


def torch_available() -> bool:
    """Whether the export extra (torch, diffusers, optimum) is installed here."""
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers", "optimum"))
    except ImportError:
        return False


def choose_converter(converter: str, taesd: str | None = None, fusions: str = "none") -> str:
    """``torch`` (the optimum export, checked against torch) or ``template`` (torch-free, see exporters.convert).

    ``auto`` takes torch where the export extra is installed, else the templates."""
    if converter not in CONVERTERS:
        raise ExportError(f"converter '{converter}' is not known; use one of {', '.join(CONVERTERS)}")
    if converter == "auto":
        converter = "torch" if torch_available() else "template"
    if converter == "torch" and not torch_available():
        raise ExportError("converter 'torch' needs the export extra: pip install 'text2image-sd2[export]'")
    if converter == "template":
        needs_torch = "--taesd" if taesd else f"--fusions {fusions}" if fusions != "none" else None
        if needs_torch:
            raise ExportError(f"{needs_torch} needs the export extra (pip install 'text2image-sd2[export]'); the "
                              "torch-free converter writes the plain graphs only")
    return converter


def export_model(source: str, fmt: str, out: Path, precision: str = "fp32",
                 say: Callable[[str], None] = print, origin: dict[str, Any] | None = None,
                 taesd: str | None = None, fusions: str = "none", converter: str = "auto",
                 progress: Callable[[float], None] | None = None,
                 defaults: Mapping[str, Any] | None = None,
                 int8_matmuls: bool | Sequence[str] = False) -> Path:
    """Export SOURCE to ``out`` in ``fmt`` (onnx | openvino) at ``precision`` (fp32 | fp16 | int8) and check it.

    ``fusions`` (ONNX only) applies onnxruntime's graph fusions: ``cpu`` those with CPU kernels, ``cuda`` the full
    CUDA set (the graphs then run on onnxruntime's CUDA provider only; with fp16 this is onnxruntime's own GPU
    recipe). Each component is checked against torch before fusing, and after fusing where it can run here.

    ``origin`` describes where an already downloaded SOURCE folder came from (hub id and revision); it goes into
    the manifest. ``defaults`` are the generation defaults (steps, guidance, scheduler) the manifest records for
    the runtime. ``taesd`` adds the TAESD decoder from that source ('tiny',
    'random', a folder or a hub id such as madebyollin/taesd) as ``taesd_decoder/``.

    ``converter``: torch (optimum's export, each graph checked against torch), template (no torch: the
    checkpoint's safetensors bound into graph templates of the same export), or auto (torch where installed).
    ``progress`` gets the fraction done (template converter).

    ``int8_matmuls`` (OpenVINO, fp32/fp16) stores the weights of the text encoder's and the UNet's matrix products
    (True), or of the graphs it names (e.g. ``("text_encoder",)``), in int8 with a scale per channel
    (:mod:`exporters.weight_int8`): OpenVINO keeps them in int8 when it compiles, so the compiled model holds less,
    for a small change in pixels (tests/test_memory_levers.py); as fast where OpenVINO computes in f32, slower where
    it computes in bf16 (see backend.model_store.store_export).

    Re-running on a finished folder says so and does nothing; an interrupted run resumes after the last finished
    component.
    """
    if fmt not in FORMATS:
        raise ExportError(f"format '{fmt}' is not known; use one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise ExportError(f"precision '{precision}' is not known; use one of {', '.join(PRECISIONS)}")
    if precision == "int8" and fmt != "openvino":
        raise ExportError("precision 'int8' is made with OpenVINO's NNCF; use --format openvino")
    from exporters.onnx_graphs import FUSIONS

    if fusions not in FUSIONS:
        raise ExportError(f"fusions '{fusions}' is not known; use one of {', '.join(FUSIONS)}")
    from exporters.weight_int8 import INT8_MATMUL_GRAPHS

    compressed = _int8_graphs(int8_matmuls, INT8_MATMUL_GRAPHS)
    if compressed and fmt != "openvino":
        raise ExportError("int8 MatMul weights are an OpenVINO graph rewrite; use --format openvino")
    if fusions != "none" and fmt != "onnx":
        raise ExportError(f"fusions '{fusions}' are onnxruntime graph fusions; use --format onnx (OpenVINO fuses "
                          "its graphs itself when it compiles them)")
    converter = choose_converter(converter, taesd, fusions)
    # int8 starts as an fp32 export, checked against torch, and is quantized once the bundle is complete.
    graph_precision = "fp32" if precision == "int8" else precision
    out = Path(out)
    wanted = {"source": source, "format": fmt, "precision": precision}
    if taesd:
        wanted["taesd"] = taesd
    if fusions != "none":
        wanted["fusions"] = fusions
    if compressed and precision != "int8":  # precision int8 quantizes these graphs anyway
        wanted["int8_matmuls"] = "true" if compressed == INT8_MATMUL_GRAPHS else ",".join(compressed)
    if (out / MANIFEST).is_file():
        done = json.loads((out / MANIFEST).read_text())
        if done.get("request") == wanted:
            say(f"{out} is already a finished {fmt}/{precision} export of {source}; nothing to do")
            return out
        raise ExportError(f"{out} already holds a different export ({done.get('request')}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = (json.loads((out / STATE).read_text()) if (out / STATE).is_file()
                             else {"request": wanted, "done": {}})
    if state["request"] != wanted:
        raise ExportError(f"{out} holds an unfinished export of {state['request']}; remove it or choose another --out")

    def finished(name: str, error: float) -> None:
        state["done"][name] = error
        (out / STATE).write_text(json.dumps(state))

    with tempfile.TemporaryDirectory(prefix="t2i-export-") as tmp:
        src, found = resolve_source(source, Path(tmp))
        origin = origin or found
        # Every config and safetensors header is checked before a converter (or diffusers) reads the checkpoint:
        # a damaged or hostile file is refused naming it, not deep in a conversion.
        check_checkpoint(src)
        if converter == "torch":
            _export_with_torch(src, fmt, graph_precision, out, Path(tmp), state["done"], finished, say, taesd,
                               fusions)
        else:
            from exporters.convert import convert_checkpoint
            from exporters.graph_template import TemplateError

            try:
                convert_checkpoint(src, fmt, out, graph_precision, state["done"], finished, progress, say)
            except TemplateError as exc:
                raise ExportError(str(exc)) from None
    extra: dict[str, Any] = {"converter": converter}
    if precision == "int8":
        from exporters.int8 import quantize_bundle

        extra["quantization"] = quantize_bundle(out, say=say)
    elif compressed:
        from exporters.weight_int8 import compress_graph

        # Recorded per graph, so that a resumed export does not compress a graph twice.
        weights = state.setdefault("weights", {})
        for name in compressed:
            if name not in weights:
                say(f"int8 MatMul weights: {name} …")
                weights[name] = compress_graph(out / name / "openvino_model.xml")
                (out / STATE).write_text(json.dumps(state))
        extra["weights"] = weights
    _write_manifest(out, fmt, precision, origin, wanted, state["done"], dict(defaults or {}), extra)
    (out / STATE).unlink()
    say(f"exported {source} → {out} ({fmt}, {precision})")
    return out


def _int8_graphs(choice: bool | Sequence[str], known: tuple[str, ...]) -> tuple[str, ...]:
    """The graphs ``int8_matmuls`` asks to compress, in ``known``'s order; an unknown name is an ExportError."""
    if isinstance(choice, bool):
        return known if choice else ()
    choice = (choice,) if isinstance(choice, str) else tuple(choice)
    unknown = sorted(set(choice) - set(known))
    if unknown:
        raise ExportError(f"int8 MatMul weights for {', '.join(map(repr, unknown))}: not known; choose from "
                          f"{', '.join(known)}")
    return tuple(name for name in known if name in choice)


def _export_with_torch(src: Path, fmt: str, precision: str, out: Path, tmp: Path, done: dict[str, float],
                       finished: Callable[[str, float], None], say: Callable[[str], None], taesd: str | None,
                       fusions: str) -> None:
    """optimum's ONNX export of each component not in ``done``, finished to ``fmt``/``precision`` and checked
    against its torch model."""
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline
    from tqdm import tqdm

    from exporters.onnx_graphs import export_component, export_configs

    # torch's tracer warns about every Python branch in diffusers' code; none of them matter for these shapes.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
    # A download keeps only the fp16 weights where a repository has them; diffusers loads them by variant name.
    variant = None if (src / "unet" / "diffusion_pytorch_model.safetensors").is_file() else "fp16"
    try:
        pipe = StableDiffusionPipeline.from_pretrained(src, torch_dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False, variant=variant)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # diffusers' own texts run to pages
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"diffusers cannot load the checkpoint {src}: {quoted(first, 300)}") from None
    upcast = bool(pipe.unet.config.get("upcast_attention", False))
    pairs = export_configs(pipe)
    onnx_dir = out if fmt == "onnx" else tmp / "onnx"
    bar = tqdm(COMPONENTS, desc="export", unit="component")
    for comp in bar:
        bar.set_description(f"export {comp.name}")
        if comp.name in done:
            say(f"{comp.name}: already exported and checked (error {done[comp.name]:.2g}), skipping")
            continue
        graph = export_component(comp.name, pairs[comp.name], onnx_dir)
        try:
            finished(comp.name, _finish_component(
                comp.name, graph, pairs[comp.name][0], fmt, precision, out,
                comp.tolerance, keep_attention_fp32=upcast and comp.name == "unet", fusions=fusions))
        except ExportCheckError as exc:
            raise ExportError(f"{exc} (checkpoint {src})") from None
    if taesd:
        finished("taesd_decoder", _export_taesd(taesd, fmt, precision, onnx_dir, out, tmp, done.get("taesd_decoder"),
                                                say, fusions))
    pipe.scheduler.save_pretrained(out / "scheduler")
    pipe.tokenizer.save_pretrained(out / "tokenizer")
    pipe.save_config(out)
    write_model_index(json.loads((out / "model_index.json").read_text()), out)


def _finish_component(name: str, graph: Path, model: Any, fmt: str, precision: str, out: Path,
                      tolerances: dict[str, float], keep_attention_fp32: bool = False, fusions: str = "none") -> float:
    """An exported ONNX graph → the bundle's format, precision and fusions, checked against its torch model within
    ``tolerances[precision]``; returns the measured error (of the final graph where it runs here, else of the fp32
    graph before fusing)."""
    from exporters.onnx_graphs import fuse
    from runtime.engines import cuda_usable

    tolerance = tolerances[precision]
    if fusions != "none":
        # Fusions match fp32 patterns only: check the plain fp32 graph, fuse, convert, then check what can run here.
        error = check_component(name, model, graph, tolerances["fp32"])
        fused = fuse(graph, name, fusions, precision == "fp16", keep_attention_fp32)
        log.info("%s: fused %s", name, fused or "nothing")
        if fusions == "cpu" or cuda_usable():
            return check_component(name, model, graph, tolerance, on_cuda=fusions == "cuda")
        log.warning("%s: no GPU here, so the CUDA-fused graph was checked before fusing only", name)
        return error
    if fmt == "openvino":
        (out / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(graph.parent / "config.json", out / name / "config.json")
    graph = finish_graph(graph, fmt, precision, out / name, keep_attention_fp32)
    return check_component(name, model, graph, tolerance)


def _export_taesd(source: str, fmt: str, precision: str, onnx_dir: Path, out: Path, tmp: Path,
                  done: float | None, say: Callable[[str], None], fusions: str = "none") -> float:
    from exporters import taesd as t

    if done is not None:
        say(f"{t.FOLDER}: already exported and checked (error {done:.2g}), skipping")
        return done
    model = t.load_taesd(source, tmp)
    graph = t.export_taesd(model, onnx_dir)
    return _finish_component(t.FOLDER, graph, model, fmt, precision, out, t.TOLERANCE, fusions=fusions)


def _write_manifest(out: Path, fmt: str, precision: str, origin: dict[str, Any], request: dict[str, str],
                    errors: dict[str, float], defaults: dict[str, Any], extra: dict[str, Any]) -> None:
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, STATE) and not p.relative_to(out).parts[0].startswith("."):
            rel = p.relative_to(out).as_posix()
            files[rel] = {"size": p.stat().st_size, "sha256": file_digest(p)}
    manifest = {
        "format_version": MANIFEST_VERSION,
        "format": fmt,
        "precision": precision,
        "source": origin,
        "request": request,
        "static_shape": None,
        "defaults": defaults,
        "exporter": {"name": "text2image-sd2", "version": EXPORTER_VERSION},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "check_errors": errors,
        **extra,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
