"""The safetensors format as the streaming merge reads and writes it: a model folder's weight files and their
tensors' names and shapes (headers only), one tensor read at a time, and files written tensor by tensor behind a
header computed up front, so that neither a whole model nor a whole file is ever in memory.

    from export.safetensors_io import read_layout
    shards = read_layout(Path("base"), dtypes=("BF16", "F16", "F32"))   # [Shard("model.safetensors", [...])]

A file is an 8-byte little-endian header length, a JSON header (each tensor's dtype, shape and byte offsets) and
the tensors' raw little-endian bytes in order; a sharded model lists which file holds each tensor in an index.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from export.errors import ExportError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

CAST_BLOCK = 1 << 24  # values cast per step when writing: a 128256×3072 embedding never exists twice at once


@dataclass
class Shard:
    file_name: str
    tensors: list[tuple[str, list[int]]]  # (name, shape) in the order written


# ---------------------------------------------------------------------------------------------- reading


def read_json(path: Path, fix: str):
    """A JSON file of a model folder (its index, config.json…); missing or unreadable, an ExportError ending in
    `fix`."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ExportError(f"{path} is missing; {fix}") from error
    except (OSError, ValueError) as error:
        raise ExportError(f"{path} is unreadable ({error}); {fix}") from error


def open_safetensors(path: Path):
    """A safe_open handle that reads each tensor with pread(2).

    The default "mmap" backend leaves every page it touched resident: streaming a 1.5 GB file tensor by tensor
    grew RSS to 1.8 GB with mmap and to 0.3 GB with pread (safetensors 0.8).
    """
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt", backend="pread")
    except (SafetensorError, OSError) as error:
        raise ExportError(f"cannot read {path}: {error} (truncated or corrupt?); re-download or re-save that "
                          "file") from error


def read_layout(base_dir: Path, dtypes: tuple[str, ...]) -> list[Shard]:
    """The base's safetensors files and, per file, its tensors' names and shapes (headers only); every tensor must
    have one of `dtypes` (safetensors dtype codes)."""
    if (base_dir / INDEX_FILE).is_file():
        index = read_json(base_dir / INDEX_FILE, "re-download the base model")
        file_names = sorted(set(index.get("weight_map", {}).values()))
        if not file_names:
            raise ExportError(f"{base_dir / INDEX_FILE} lists no weight files; re-download the base model")
    elif (base_dir / SINGLE_FILE).is_file():
        file_names = [SINGLE_FILE]
    else:
        raise ExportError(f"{base_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; pass a Hugging Face model "
                          "folder with safetensors weights as --base")
    shards = []
    for file_name in file_names:
        with open_safetensors(base_dir / file_name) as handle:
            tensors = []
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                if tensor_slice.get_dtype() not in dtypes:
                    raise ExportError(f"{base_dir / file_name}: tensor {name} is {tensor_slice.get_dtype()}, not "
                                      f"one of {', '.join(dtypes)}; pass the 16-bit (unquantized) base")
                tensors.append((name, list(tensor_slice.get_shape())))
        shards.append(Shard(file_name, tensors))
    return shards


def read_tensor(handle, name: str, path: Path):
    """Tensor `name` of the file `path` opened as `handle`."""
    from safetensors import SafetensorError

    try:
        return handle.get_tensor(name)
    except (SafetensorError, OSError) as error:
        raise ExportError(f"cannot read tensor {name} from {path}: {error}; re-download or re-save that "
                          "file") from error


# ---------------------------------------------------------------------------------------------- writing


def safetensors_header(tensors: list[tuple[str, list[int]]], dtype_code: str, value_bytes: int) -> bytes:
    """The start of a safetensors file holding `tensors` in order, all of one dtype: the header's length as
    8-byte little-endian, then the JSON header padded with spaces to a multiple of 8 (as the safetensors
    library pads it, so that tensor data starts 8-byte aligned).

    >>> header = safetensors_header([("w", [2, 3])], "F16", 2)
    >>> len(header) % 8, header[8:].decode().rstrip()
    (0, '{"__metadata__":{"format":"pt"},"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}')
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = math.prod(shape) * value_bytes
        header[name] = {"dtype": dtype_code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def write_tensor(out, tensor, dtype) -> None:
    """`tensor`'s values cast to the torch `dtype`, appended to the open file `out` (after its header)."""
    import torch

    # Cast and write in blocks: the cast copy of a big tensor never exists whole next to the original.
    # Raw bytes in native order: safetensors is little-endian, like every platform torch runs on.
    for block in tensor.reshape(-1).split(CAST_BLOCK):
        out.write(block.to(dtype).view(torch.uint8).numpy())


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index of a sharded model: which file holds each tensor, and the tensors' total bytes."""
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total_size},
                                                 "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
