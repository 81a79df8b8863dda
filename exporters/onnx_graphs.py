"""ONNX export of the SD components with optimum, one component at a time (so progress and re-runs are per
component), the fp16 conversion, and onnxruntime's graph fusions."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from exporters.contract import OPSET

log = logging.getLogger(__name__)


def export_configs(pipe: Any) -> dict[str, Any]:
    """optimum's (model, export config) pairs for the components we ship; the VAE encoder is not needed for
    text-to-image and is left out.

    A TAESD VAE (``AutoencoderTiny``, SDXS's own decoder) has no optimum config (optimum's reads AutoencoderKL's
    fields): its pair is the model, its forward being ``decode`` as optimum makes the VAE's, with the config None,
    and :func:`export_component` exports it as ``exporters.taesd`` exports TAESD."""
    import copy

    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs with the TasksManager)
    from optimum.exporters.utils import get_diffusion_models_for_export

    from exporters.taesd import is_taesd

    models = get_diffusion_models_for_export(pipe, int_dtype="int64", float_dtype="fp32", exporter="onnx")
    pairs = {name: models[name] for name in ("text_encoder", "unet")}
    if is_taesd(pipe.vae):
        decoder = copy.deepcopy(pipe.vae)
        decoder.forward = lambda latent_sample: decoder.decode(latent_sample)
        pairs["vae_decoder"] = (decoder, None)
    else:
        pairs["vae_decoder"] = models["vae_decoder"]
    return pairs


def export_component(name: str, model_and_config: Any, out: Path) -> Path:
    """Write ``out/<name>/model.onnx`` (plus ``model.onnx_data`` when over 2 GB) and the component's config."""
    from optimum.exporters.onnx.convert import export_models

    model, config = model_and_config
    if config is None:  # a TAESD decoder (see export_configs)
        from exporters.taesd import export_taesd

        return export_taesd(model, out, folder=name)
    (out / name).mkdir(parents=True, exist_ok=True)
    if hasattr(model, "save_config"):
        model.save_config(out / name)
    elif hasattr(model, "config") and hasattr(model.config, "save_pretrained"):
        model.config.save_pretrained(out / name)
    export_models({name: model_and_config}, output_dir=out, opset=OPSET, output_names=[f"{name}/model.onnx"],
                  device="cpu")
    return out / name / "model.onnx"


def to_fp16(path: Path, keep_attention_fp32: bool) -> None:
    """Convert a graph's weights and math to fp16 in place, inputs and outputs staying fp32.

    ``keep_attention_fp32``: models trained with ``upcast_attention`` (sd2.1 768) overflow in fp16 attention and
    give black images, so their attention MatMul/Softmax nodes stay fp32.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The converter needs every tensor's type to put Casts around the nodes it keeps in fp32; infer them from the
    # file (in-memory inference refuses models over 2 GB).
    inferred = path.with_name("inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    model = onnx.load(str(inferred), load_external_data=True)
    inferred.unlink()
    producers = {out: node for node in model.graph.node for out in node.output}
    # Resize takes its roi/scales as float32 by definition; the converter would turn those constants to fp16 too.
    blocked = [producers[i].name for node in model.graph.node if node.op_type == "Resize"
               for i in node.input[1:] if i in producers and producers[i].op_type == "Constant"]
    if keep_attention_fp32:
        blocked += [n.name for n in model.graph.node
                    if ("/attn1/" in n.name or "/attn2/" in n.name) and "/to_" not in n.name  # not the projections
                    and n.op_type in ("MatMul", "Softmax", "Mul")]
    model = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked, disable_shape_infer=True)
    save_onnx(model, path)


def save_onnx(model: Any, path: Path) -> None:
    """Save a graph, its weights in one side file when the protobuf would pass 2 GB.

    Written into a scratch folder beside it first and then moved over the old files, so a failed save leaves the
    previous graph and weights intact.
    """
    import onnx

    data = path.with_name(path.name + "_data")
    try:
        big = model.ByteSize() > 2_000_000_000
    except Exception:  # protobuf refuses to even measure a message over 2 GB (EncodeError)
        big = True
    scratch = path.parent / ".saving"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    if big:
        onnx.save_model(model, str(scratch / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(scratch / path.name))
    (scratch / path.name).replace(path)
    if (scratch / data.name).exists():
        (scratch / data.name).replace(data)
    elif data.exists():
        data.unlink()
    scratch.rmdir()


#: Graph fusions of onnxruntime's transformer optimizer. none: the plain graph, which every engine reads. cpu: the
#: fused ops that have CPU kernels (attention, LayerNorm, Gelu). cuda: the full CUDA set (fused attention, NHWC
#: convolutions, GroupNorm, BiasSplitGelu …); those graphs run on onnxruntime's CUDA provider only.
FUSIONS = ("none", "cpu", "cuda")
#: Fused ops that onnxruntime's CPU provider has no kernel for (session creation fails with NOT_IMPLEMENTED).
CUDA_ONLY_OPS = ("GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd", "NhwcConv", "NhwcFusedConv")
_MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae", "taesd_decoder": "vae"}


def fuse(path: Path, component: str, target: str, fp16: bool, keep_attention_fp32: bool) -> dict[str, int]:
    """Apply onnxruntime's fusions for ``target`` (cpu | cuda) to a fp32 graph in place, then convert it to fp16
    when asked (fusion first: the patterns no longer match after the conversion). Returns the fused ops' counts.

    ``keep_attention_fp32`` keeps the fused attention in fp32 for models trained with ``upcast_attention``
    (sd2.1 768), whose fp16 attention overflows into black images.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = _MODEL_TYPES[component]
    options = FusionOptions(model_type)
    if model_type in ("unet", "vae"):
        cuda = target == "cuda"
        options.enable_group_norm = options.enable_skip_group_norm = cuda
        options.enable_bias_splitgelu = options.enable_bias_add = options.enable_nhwc_conv = cuda
        # Packed Q/K/V layouts have CUDA kernels only, and onnxruntime's own recipe packs them for fp16 alone.
        options.enable_packed_qkv = options.enable_packed_kv = cuda and fp16
    optimized = optimize_model(str(path), model_type=model_type, opt_level=0, use_gpu=target == "cuda",
                               optimization_options=options)
    if fp16:
        blocked = [n.name for n in optimized.model.graph.node if n.op_type == "Resize"]
        ops = ["MultiHeadAttention", "Attention"] if keep_attention_fp32 else []
        optimized.convert_float_to_float16(keep_io_types=True, op_block_list=ops, node_block_list=blocked)
        optimized.topological_sort()  # the converter appends its input Casts at the end of the node list
    counts = Counter(n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft")
    if counts and not any(o.domain == "com.microsoft" for o in optimized.model.opset_import):
        import onnx

        # Declare the contrib domain the fused ops live in; strict readers (onnx.checker) refuse the graph without.
        optimized.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    save_onnx(optimized.model, path)
    return dict(sorted(counts.items()))
