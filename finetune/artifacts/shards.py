"""Safetensors files read and written one tensor at a time.

`safetensors.torch.save_file` needs every tensor of a file in memory at once; a merged shard is written
here header first (every shape and offset is known from the input's header), then tensor by tensor.
Tensors are read with plain file reads, not through `safe_open`'s memory map: the pages of a mapped file
that have been read stay in the process's resident memory until the file is closed, which made a merge's
peak one whole input shard plus a tensor (measured in benchmarks/merge_memory.py); read this way it is
about the largest tensor.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import InputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# safetensors dtype names (as its header spells them) -> bytes per element
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass(frozen=True)
class Shard:
    path: Path
    names: tuple[str, ...]


def list_shards(folder: Path) -> list[Shard]:
    """The safetensors files of a model folder (from its index when sharded), each with its tensor names.

    Raises:
        InputError: the folder holds no safetensors weights.
    """
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise InputError(f"{folder}: no {SINGLE} or {INDEX}; merging needs the base model's safetensors weights")
    return [Shard(folder / name, tuple(tensor_infos(folder / name))) for name in files]


def tensor_infos(path: Path) -> dict[str, dict]:
    """The header of a safetensors file: {name: {dtype, shape, data_offsets}}, without reading any tensor."""
    with path.open("rb") as f:
        return _read_header(f)[0]


def _read_header(f) -> tuple[dict, int]:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


class ShardReader:
    """Tensors of one safetensors file, each read from disk when asked for (no memory map).

    >>> with ShardReader(path) as shard:
    ...     weight = shard.get("model.norm.weight")
    """

    def __init__(self, path: Path):
        self.path = path
        self.file = path.open("rb")
        self.infos, self.data_start = _read_header(self.file)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.infos[name]["shape"])

    def dtype(self, name: str):
        return torch_dtype(self.infos[name]["dtype"])

    def get(self, name: str):
        """A new CPU tensor holding `name`."""
        import torch

        begin, end = self.infos[name]["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        self.file.seek(self.data_start + begin)
        if self.file.readinto(raw.numpy()) != end - begin:
            raise InputError(f"{self.path}: truncated safetensors file ({name} is cut short)")
        return raw.view(self.dtype(name)).reshape(self.shape(name))

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


class ShardWriter:
    """Writes one safetensors file whose tensors (names, shapes, dtypes) are declared up front.

    >>> with ShardWriter(path, {"w": ((2, 2), "F32")}) as out:
    ...     out.write("w", torch.zeros(2, 2))
    """

    def __init__(self, path: Path, layout: dict[str, tuple[tuple[int, ...], str]]):
        self.path = path
        self.layout = layout
        header, offset = {}, 0
        for name, (shape, dtype) in layout.items():
            size = _numel(shape) * ITEM_SIZES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self.pending = list(layout)
        self.total_size = offset
        self.file = path.open("wb")
        self.file.write(struct.pack("<Q", len(encoded)) + encoded)

    def write(self, name: str, tensor) -> None:
        """Append the next tensor; tensors must come in the declared order, shape and dtype."""
        expected = self.pending.pop(0)
        shape, dtype = self.layout[name]
        if name != expected or tuple(tensor.shape) != tuple(shape) or safetensors_dtype(tensor.dtype) != dtype:
            raise ValueError(f"{self.path.name}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected}")
        import torch

        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        if exc[0] is None and self.pending:
            raise ValueError(f"{self.path.name}: {len(self.pending)} declared tensor(s) never written")


def shard_names(count: int) -> Iterator[str]:
    """File names transformers gives the shards of a model: model.safetensors, or model-0000i-of-0000n."""
    if count == 1:
        yield SINGLE
        return
    for i in range(1, count + 1):
        yield f"model-{i:05d}-of-{count:05d}.safetensors"


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """model.safetensors.index.json for a sharded folder (none is needed for a single file)."""
    if len(set(weight_map.values())) < 2:
        return
    payload = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _dtype_names() -> dict:
    import torch

    return {
        torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
        torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
        torch.bool: "BOOL",
    }  # fmt: skip


def safetensors_dtype(dtype) -> str:
    """A torch dtype's name in a safetensors header."""
    return _dtype_names()[dtype]


def torch_dtype(name: str):
    """The torch dtype of a safetensors header's dtype name."""
    return {value: key for key, value in _dtype_names().items()}[name]


def checkpoint_dtype(shards: list[Shard]):
    """The torch dtype the checkpoint stores its floating tensors in (that of the first one found)."""
    for shard in shards:
        for info in tensor_infos(shard.path).values():
            dtype = torch_dtype(info["dtype"])
            if dtype.is_floating_point:
                return dtype
    raise InputError(f"{shards[0].path.parent}: no floating-point tensor in the checkpoint")
