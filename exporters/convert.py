"""A diffusers checkpoint → bundle components without torch: the checkpoint's safetensors are bound into the graph
templates (``exporters.graph_template``), which gives the fp32 ONNX graphs the torch export writes; the fp16 and
OpenVINO steps after that are the torch export's own. This is what the torch-free images run at ``/init``.

Each finished graph is checked against the fp32 ONNX graph it was made from (there is no torch model to compare
with here); that the fp32 graph itself is the torch export's computation is proved when the templates are built.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from exporters.check import compare, exported_output, sample_inputs
from exporters.checkpoint_files import read_json
from exporters.contract import COMPONENTS
from exporters.graph_template import CHECKPOINT_FOLDERS, Template, TemplateError, read_checkpoint_configs, select

#: Weight files in the order they are preferred when a checkpoint folder holds several.
WEIGHT_VARIANTS = ("", ".fp16")
#: Scratch folder inside the bundle being written; never part of a finished bundle.
WORK = ".binding"


def checkpoint_configs(src: Path) -> dict[str, dict[str, Any]]:
    """The component configs of a local diffusers folder."""
    def read(rel: str) -> dict[str, Any]:
        path = src / rel
        if not path.is_file():
            raise TemplateError(f"checkpoint folder '{src}' has no {rel}; it is not an SD2-family diffusers folder")
        return read_json(path)

    return read_checkpoint_configs(read)


def weight_file(src: Path, component: str) -> Path:
    """The component's safetensors file in a diffusers folder: the full-precision one if present, else fp16."""
    folder, stem = CHECKPOINT_FOLDERS[component]
    for variant in WEIGHT_VARIANTS:
        path = src / folder / f"{stem}{variant}.safetensors"
        if path.is_file():
            return path
    raise TemplateError(
        f"checkpoint folder '{src / folder}' has no {stem}.safetensors or {stem}.fp16.safetensors; the torch-free "
        "converter reads safetensors only (pickled .bin/.ckpt weights need the export extra)"
    )


def templates_for(src: Path) -> dict[str, Template]:
    """The templates that cover a local checkpoint; raises TemplateError naming the mismatch."""
    return select(checkpoint_configs(src))


def finish_graph(graph: Path, fmt: str, precision: str, target: Path, keep_attention_fp32: bool) -> Path:
    """A checked fp32 ONNX graph → the bundle's format and precision: converted to fp16 in place for ONNX fp16,
    or written as ``target/openvino_model.xml`` (fp16-compressed weights for fp16). Returns the final graph."""
    from exporters.onnx_graphs import to_fp16
    from exporters.openvino_ir import convert

    if fmt == "openvino":
        return convert(graph, target / "openvino_model.xml", precision)
    if precision == "fp16":
        to_fp16(graph, keep_attention_fp32=keep_attention_fp32)
    return graph


def convert_component(src: Path, template: Template, config: Mapping[str, Any], fmt: str, precision: str,
                      out: Path, tolerance: float, progress: Callable[[float], None] | None = None) -> float:
    """Write the bundle's ``out/<component>/`` from the checkpoint at ``src``; returns the measured error of the
    final graph against the fp32 graph it came from."""
    name = template.component
    target = out / name
    target.mkdir(parents=True, exist_ok=True)
    # The fp32 graph is bound beside the bundle's files (same disk, so the move below is a rename) in a dot folder
    # that the manifest leaves out; a leftover from an interrupted run is removed first.
    tmp = out / WORK
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        graph = template.bind(weight_file(src, name), tmp,
                              on_tensor=(lambda done, total: progress(0.8 * done / total)) if progress else None)
        feeds = sample_inputs(name, config)
        reference = exported_output(graph, feeds)
        if fmt == "onnx":
            for part in ("model.onnx", "model.onnx_data"):
                (tmp / part).replace(target / part)
            graph = target / "model.onnx"
        graph = finish_graph(graph, fmt, precision, target,
                             keep_attention_fp32=name == "unet" and bool(config.get("upcast_attention")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    error = compare(name, exported_output(graph, feeds), reference, tolerance, "the fp32 graph bound from its template")
    if progress:
        progress(1.0)
    return error


def copy_pipeline_files(src: Path, out: Path) -> None:
    """Scheduler, tokenizer and model_index.json from a diffusers folder, as the torch export writes them."""
    shutil.copytree(src / "scheduler", out / "scheduler", dirs_exist_ok=True)
    shutil.copytree(src / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    write_model_index(read_json(src / "model_index.json"), out)


def write_model_index(index: dict[str, Any], out: Path) -> None:
    """optimum's model_index.json: the diffusers one with the VAE split into the decoder we ship, of the VAE's
    class (AutoencoderKL, or AutoencoderTiny for SDXS)."""
    index = dict(index)
    vae = index.pop("vae", None)
    index.pop("_name_or_path", None)  # a temporary path on the exporting machine
    index["vae_decoder"] = vae if isinstance(vae, list) and vae[1:] == ["AutoencoderTiny"] else ["diffusers",
                                                                                              "AutoencoderKL"]
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def _part(progress: Callable[[float], None] | None, start: float, share: float) -> Callable[[float], None] | None:
    """``progress`` for one stage that covers ``share`` of the whole from ``start`` on."""
    if progress is None:
        return None
    return lambda fraction: progress(start + share * fraction)


def convert_checkpoint(src: Path, fmt: str, out: Path, precision: str, done: dict[str, float],
                       on_component: Callable[[str, float], None],
                       progress: Callable[[float], None] | None = None,
                       say: Callable[[str], None] = print) -> dict[str, float]:
    """Convert every component not in ``done`` (name → measured error) at ``precision`` (fp32 | fp16);
    ``on_component`` is told of each one as it finishes, so an interrupted run resumes after it. ``progress`` gets
    the fraction of the work done."""
    configs = checkpoint_configs(src)
    templates = select(configs)
    # The UNet is about two thirds of the weights, the text encoder a quarter, the VAE decoder the rest.
    shares = {"text_encoder": 0.26, "unet": 0.66, "vae_decoder": 0.08}
    base = 0.0
    for comp in COMPONENTS:
        share = shares[comp.name]
        if comp.name in done:
            say(f"{comp.name}: already converted and checked (error {done[comp.name]:.2g}), skipping")
        else:
            say(f"{comp.name}: binding the checkpoint into the {templates[comp.name].architecture} template")
            error = convert_component(src, templates[comp.name], configs[comp.name], fmt, precision, out,
                                      comp.tolerance[precision], progress=_part(progress, base, share))
            done[comp.name] = error
            on_component(comp.name, error)
        base += share
        if progress:
            progress(base)
    copy_pipeline_files(src, out)
    return done
