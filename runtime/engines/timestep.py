"""The timestep's projection in f32 when OpenVINO computes a UNet in bf16.

bf16 keeps 8 significant bits, so a timestep above 256 is rounded as it enters the graph: 999 becomes 1000 (outside
the 0-999 the model was trained on; sd-turbo's one step is at 999), 997 becomes 996. The UNet's first layers turn
the timestep into sines and cosines of ``t × frequency``, where such a rounding moves the phases by up to a radian.
Measured on the full-size SD2.1 UNet, bf16 math gave exactly the same output for 999 and 1000.

:func:`split_timestep` cuts that projection out of the graph: the part that depends on the timestep alone, up to the
first matrix product, becomes a small model of its own (run in f32, microseconds), and the UNet takes its result as
an input. The values then enter the bf16 graph as sines and cosines in [-1, 1], where bf16's relative error is 0.4 %.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The input name the UNet graph's projected timestep gets.
PROJECTED = "timestep_projection"


@dataclass
class SplitTimestep:
    """A UNet graph without its timestep projection (``unet``, taking :data:`PROJECTED`), and the projection
    (``projection``: the timestep in, the sinusoids out). ``keeps_timestep``: the UNet still reads the raw timestep
    elsewhere too."""

    unet: Any
    projection: Any
    keeps_timestep: bool


def split_timestep(model: Any, name: str = "timestep") -> SplitTimestep | None:
    """Split ``model`` (an ``openvino.Model``) at the output of its timestep-only part, or None when it has no input
    ``name`` or that part ends in no matrix product (nothing to split). The split rewires ``model``'s own graph:
    use the returned models, not ``model``, afterwards."""
    import openvino as ov
    import openvino.opset13 as ops

    params = list(model.get_parameters())
    timestep = next((p for p in params if name in p.output(0).get_names()), None)
    if timestep is None:
        return None
    # Nodes compare and hash by the graph node they wrap (each call returns new Python objects, so never by id()).
    others = {p for p in params if p != timestep}
    depends: set[Any] = set()  # nodes whose values depend on another input (a shape read by ShapeOf does not count)
    reached: set[Any] = {timestep}  # nodes the timestep's value flows into
    cut = None
    for op in model.get_ordered_ops():
        sources = [i.get_source_output().get_node() for i in op.inputs()]
        if op in others or (op.get_type_name() not in ("ShapeOf", "Constant") and any(s in depends for s in sources)):
            depends.add(op)
            continue
        if op == timestep or not any(s in reached for s in sources):
            continue
        reached.add(op)
        if cut is None and op.get_type_name() == "MatMul":
            data = op.input(0).get_source_output()
            if data.get_node() in reached:
                cut = data
    if cut is None:
        return None
    try:
        projection = ov.Model([cut], [timestep], "timestep_projection")
    except RuntimeError:  # it reads the batch size off another input's shape (diffusers' expand): that input too
        projection = ov.Model([cut], params, "timestep_projection")
    replacement = ops.parameter(cut.get_partial_shape(), cut.get_element_type(), name=PROJECTED)
    replacement.output(0).set_names({PROJECTED})
    for target in list(cut.get_target_inputs()):
        if target.get_node().get_type_name() != "Result":
            target.replace_source_output(replacement.output(0))
    rest = [p for p in params if p != timestep] + [replacement]
    try:
        unet = ov.Model(model.get_results(), rest, model.get_friendly_name())
        keeps = False
    except RuntimeError:  # the timestep is still read elsewhere in the graph: keep it as an input too
        unet = ov.Model(model.get_results(), [*rest, timestep], model.get_friendly_name())
        keeps = True
    return SplitTimestep(unet, projection, keeps)
