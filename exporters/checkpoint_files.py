"""Reading a diffusers checkpoint's files as outside input: its JSON configs (capped in size, each must be a JSON
object) and its safetensors headers (parsed and checked here before any library maps the file), so that a damaged
or hostile checkpoint is refused with one line naming the file and what is wrong.

A safetensors file is an 8-byte little-endian header length, that many bytes of a JSON object (tensor name →
``dtype``, ``shape``, ``data_offsets`` [begin, end) into the data that follows; an optional ``__metadata__`` object
of strings), then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.bundle import MAX_JSON_BYTES
from runtime.errors import T2IError, quoted

#: A header larger than this is refused unread; a real SD2 UNet's is about 200 kB.
MAX_HEADER_BYTES = 16 * 1024 * 1024
#: Bytes per element of each safetensors dtype.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(T2IError, RuntimeError):
    """A checkpoint file that is damaged, or not what a diffusers checkpoint holds; the message names it."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file as its header describes it; ``begin``/``end`` are byte offsets into the
    data area."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON config: at most :data:`MAX_JSON_BYTES` read, and it must hold a JSON object."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(f"checkpoint file {path} is over {MAX_JSON_BYTES:,} bytes; no config is this large, "
                              "so it is not read")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested thousands deep
        raise CheckpointError(f"checkpoint file {path} is not JSON: {quoted(str(exc).splitlines()[0], 120)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint file {path} must hold a JSON object, found a {type(data).__name__} "
                              f"({quoted(raw[:60].decode('utf-8', 'replace'), 60)})")
    return data


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, after checking its header against the file: the length fits the
    file and the cap, the header is a JSON object, each tensor has a known dtype, a shape of non-negative
    integers, and offsets inside the data area that match its size; the tensors tile the data area exactly (no
    overlap, no gap)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a valid safetensors file: {why}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if length < 0:
                raise bad(f"it has {size} bytes, fewer than the 8 of the header length")
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header length {length:,} is over the {size - 8:,} bytes that follow it or over the "
                          f"{MAX_HEADER_BYTES:,} a header may have")
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"checkpoint file {path} cannot be read: {exc.strerror or type(exc).__name__}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise bad(f"its header is not JSON ({quoted(str(exc).splitlines()[0], 120)})") from None
    if not isinstance(header, dict):
        raise bad(f"its header must be a JSON object, found a {type(header).__name__}")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("its __metadata__ must be an object of strings")
    data_size = size - 8 - length
    tensors = {name: _tensor(name, entry, data_size, bad) for name, entry in header.items()}
    at = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != at:
            what = "overlaps the tensor before it" if info.begin < at else f"leaves a gap at byte {at:,}"
            raise bad(f"tensor {quoted(name)} at bytes {info.begin:,}-{info.end:,} {what}")
        at = info.end
    if at != data_size:
        raise bad(f"its tensors cover {at:,} of the {data_size:,} data bytes; the file is truncated or padded")
    return tensors


def _tensor(name: str, entry: Any, data_size: int, bad: Callable[[str], CheckpointError]) -> TensorInfo:
    if not isinstance(entry, dict):
        raise bad(f"tensor {quoted(name)} must be described by an object, found a {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise bad(f"tensor {quoted(name)} has the dtype {quoted(dtype)}; known: {', '.join(ITEMSIZE)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"tensor {quoted(name)} has the shape {quoted(shape)}; a shape is a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size):
        raise bad(f"tensor {quoted(name)} has the data_offsets {quoted(offsets)}, not inside the {data_size:,} "
                  "data bytes")
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise bad(f"tensor {quoted(name)} ({dtype} {shape}) needs {expected:,} bytes, its offsets span "
                  f"{offsets[1] - offsets[0]:,}")
    return TensorInfo(dtype, tuple(shape), offsets[0], offsets[1])


def check_checkpoint(src: Path, weights: bool = True) -> None:
    """Refuse a diffusers folder whose configs (model_index.json, the scheduler's, the components', the
    tokenizer's) are not capped JSON objects, or (``weights``) one of whose safetensors headers is damaged; before
    any converter or library reads them."""
    from exporters.graph_template import CHECKPOINT_FOLDERS

    configs = ["model_index.json", "scheduler/scheduler_config.json",
               *(f"{folder}/config.json" for folder, _ in CHECKPOINT_FOLDERS.values())]
    for rel in configs:
        read_json(src / rel)
    for path in sorted((src / "tokenizer").glob("*.json")):
        read_json(path)
    if weights:
        for folder, stem in CHECKPOINT_FOLDERS.values():
            for path in sorted((src / folder).glob(f"{stem}*.safetensors")):
                read_header(path)
