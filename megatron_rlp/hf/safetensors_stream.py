"""Write a .safetensors file one tensor at a time (the header is known up front).

The format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
N bytes of JSON `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`
(padded with spaces to a multiple of 8), then the raw little-endian tensor bytes back to back.
Since export knows every name, dtype and shape before loading any weight, it can write the header
first and stream the data, so no shard is ever held in memory whole.
"""
from __future__ import annotations

import json
import struct
from typing import List, Sequence, Tuple

import torch

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
               torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}


def nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.tensor([], dtype=dtype).element_size()


class StreamingSafetensorsWriter:
    """`entries` = [(name, dtype, shape)] in write order; call `write(name, tensor)` for each, in
    that order, then `close()`. A tensor that does not match its entry raises before writing."""

    def __init__(self, path: str, entries: List[Tuple[str, torch.dtype, tuple]],
                 metadata: dict | None = None):
        header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
        for name, dtype, shape in entries:
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be written to safetensors here")
            size = nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape],
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._entries = list(entries)
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want_name, dtype, shape = self._entries[self._next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"safetensors writer: got {name} {tensor.dtype} {tuple(tensor.shape)},"
                             f" expected {want_name} {dtype} {tuple(shape)}")
        flat = tensor.detach().contiguous().reshape(-1)
        if flat.numel():
            self._file.write(flat.view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._entries):
            missing = self._entries[self._next][0]
            self._file.close()
            raise ValueError(f"safetensors writer closed before {missing} was written")
        self._file.close()
