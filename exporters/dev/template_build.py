"""Build the graph templates of ``exporters.graph_template`` from the torch export (needs the export extra).

For an architecture given as a diffusers folder (its weights do not matter):

1. every parameter is redrawn with distinct random values, because diffusers and transformers start norm weights
   at 1 and biases at 0, and tensors equal in value could not be told apart;
2. the components are exported with the same optimum code as ``text2image export``;
3. each graph tensor is matched by value to the state-dict tensor it is, as it is or transposed; those become
   bindings and leave the graph. What matches nothing must be a weight-independent constant;
4. proof: a second, different redraw is exported by torch and also bound into the new templates, and the two graphs
   must agree tensor for tensor and node for node. A constant folded from the weights (which no binding could
   reproduce) stops the build here instead of being guessed.
"""

from __future__ import annotations

import filecmp
import inspect
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exporters.graph_template import CHECKPOINT_FOLDERS, TEMPLATE_FORMAT, TEMPLATES, Template, TemplateError

#: The checkpoint keys each bundle component is made of (the VAE's encoder is not exported).
_USED = {"vae_decoder": ("decoder.", "post_quant_conv.")}


def _redraw(pipe: Any, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def _export_draw(source: Path, seed: int, work: Path) -> tuple[Path, dict[str, Path], Any]:
    """Redraw ``source``'s weights with ``seed``, save the checkpoint and export every component with optimum."""
    import torch
    from diffusers import StableDiffusionPipeline

    from exporters.onnx_graphs import export_component, export_configs

    pipe = StableDiffusionPipeline.from_pretrained(source, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    _redraw(pipe, seed)
    checkpoint = work / f"draw{seed}"
    pipe.save_pretrained(checkpoint)
    pairs = export_configs(pipe)
    graphs = {name: export_component(name, pairs[name], work / f"onnx{seed}") for name in CHECKPOINT_FOLDERS}
    return checkpoint, graphs, pipe


def _weights(checkpoint: Path, component: str) -> Path:
    folder, stem = CHECKPOINT_FOLDERS[component]
    return checkpoint / folder / f"{stem}.safetensors"


def _tensors(model: Any) -> dict[str, np.ndarray]:
    """Every constant tensor of a graph by name: initializers and Constant node values."""
    from onnx import numpy_helper

    found = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    found[node.output[0]] = numpy_helper.to_array(a.t)
    return found


def _config_and_defaults(component: str, checkpoint: Path, pipe: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The component's config.json as the checkpoint has it, and its class defaults (for keys a checkpoint
    omits)."""
    folder, _ = CHECKPOINT_FOLDERS[component]
    config = json.loads((checkpoint / folder / "config.json").read_text())
    config.pop("_name_or_path", None)
    if component == "text_encoder":
        return config, json.loads(type(pipe.text_encoder.config)().to_json_string(use_diff=False))
    model = pipe.unet if component == "unet" else pipe.vae
    params = inspect.signature(type(model).__init__).parameters
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    return config, json.loads(json.dumps(defaults, default=str))


def _match(component: str, graph: Path, weights: Path) -> tuple[Any, list[list[Any]]]:
    """Bindings for every graph tensor that is a checkpoint tensor; the graph with those tensors removed."""
    import onnx
    from safetensors.numpy import load_file

    state = load_file(str(weights))
    prefixes = _USED.get(component)
    used = {k for k in state if prefixes is None or k.startswith(prefixes)}
    index: dict[bytes, list[tuple[str, bool]]] = {}
    for key in used:
        value = state[key].astype(np.float32)
        index.setdefault(value.tobytes(), []).append((key, False))
        if value.ndim == 2:
            index.setdefault(np.ascontiguousarray(value.T).tobytes(), []).append((key, True))
    model = onnx.load(str(graph))
    bindings = []
    for name, value in _tensors(model).items():
        if value.dtype != np.float32:
            continue
        hits = index.get(value.tobytes(), [])
        if len(hits) > 1:
            raise TemplateError(f"{component}: graph tensor {name} equals several checkpoint tensors {hits}")
        if hits:
            key, transposed = hits[0]
            bindings.append([name, key, transposed, list(value.shape)])
    unbound = used - {b[1] for b in bindings}
    if unbound:
        raise TemplateError(f"{component}: {len(unbound)} checkpoint tensor(s) appear nowhere in the graph as they "
                            f"are or transposed, e.g. {sorted(unbound)[:3]}")
    bound = {b[0] for b in bindings}
    keep = [i for i in model.graph.initializer if i.name not in bound]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if not (n.op_type == "Constant" and n.output[0] in bound)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model, sorted(bindings)


def _node_signature(model: Any) -> list[tuple[Any, ...]]:
    return [(n.op_type, n.domain, tuple(n.input), tuple(n.output), tuple(a.SerializeToString() for a in n.attribute))
            for n in model.graph.node if n.op_type != "Constant"]


def _prove(component: str, template: Template, checkpoint: Path, torch_graph: Path, work: Path) -> None:
    """Bind another draw's checkpoint into ``template``; its graph must equal what torch exported for that draw."""
    import onnx

    bound = onnx.load(str(template.bind(_weights(checkpoint, component), work / f"bound-{component}")))
    want = onnx.load(str(torch_graph))
    got_tensors, want_tensors = _tensors(bound), _tensors(want)
    if set(got_tensors) != set(want_tensors):
        raise TemplateError(f"{component}: the bound graph's tensors differ from torch's: "
                            f"{sorted(set(got_tensors) ^ set(want_tensors))[:5]}")
    differing = [n for n, v in want_tensors.items()
                 if v.dtype != got_tensors[n].dtype or v.shape != got_tensors[n].shape
                 or v.tobytes() != got_tensors[n].tobytes()]
    if differing:
        raise TemplateError(f"{component}: {len(differing)} tensor(s) depend on the weights but match no checkpoint "
                            f"tensor (constants folded from weights?), e.g. {differing[:3]}")
    if _node_signature(bound) != _node_signature(want):
        raise TemplateError(f"{component}: the bound graph's nodes differ from the torch export's")


def build_templates(source: Path, architecture: str, root: Path = TEMPLATES,
                    say: Callable[[str], None] = print) -> Path:
    """Build and prove the templates of ``source``'s architecture into ``root/architecture``; returns that folder."""
    import diffusers
    import onnx
    import torch
    import transformers

    built_with = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                  "transformers": transformers.__version__, "onnx": onnx.__version__}
    with tempfile.TemporaryDirectory(prefix="t2i-template-") as tmp:
        work = Path(tmp)
        staging = work / architecture
        staging.mkdir()
        say(f"{architecture}: exporting the first redraw")
        first, graphs, pipe = _export_draw(source, 1, work)
        for component, graph in graphs.items():
            model, bindings = _match(component, graph, _weights(first, component))
            config, defaults = _config_and_defaults(component, first, pipe)
            onnx.save_model(model, str(staging / f"{component}.onnx"))
            meta = {"format_version": TEMPLATE_FORMAT, "component": component, "config": config,
                    "defaults": defaults, "built_with": built_with, "bindings": bindings}
            (staging / f"{component}.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            say(f"{architecture}/{component}: {len(bindings)} weights bound, {len(model.graph.node)} nodes")
        del pipe
        say(f"{architecture}: exporting a second redraw to prove the templates")
        second, graphs, _ = _export_draw(source, 2, work)
        for component, graph in graphs.items():
            _prove(component, Template.load(staging, component), second, graph, work)
        target = root / architecture
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(staging, target)
    say(f"{architecture}: templates written to {target}")
    return target


def stale_files(built: Path, shipped: Path) -> list[str]:
    """The template files that differ between two template folders (JSON compared by value)."""
    names = sorted({p.name for p in built.iterdir()} | {p.name for p in shipped.iterdir()})
    differ = []
    for name in names:
        a, b = built / name, shipped / name
        if not (a.is_file() and b.is_file()):
            differ.append(name)
        elif name.endswith(".json"):
            if json.loads(a.read_text()) != json.loads(b.read_text()):
                differ.append(name)
        elif not filecmp.cmp(a, b, shallow=False):
            differ.append(name)
    return differ
