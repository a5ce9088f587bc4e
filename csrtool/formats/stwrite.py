"""Deterministic safetensors writer: same tensors and metadata, same bytes.

Why it exists: safetensors' own `save_file` serialises `__metadata__` from a hash
map, so with two or more metadata keys the header's bytes change between runs
(upstream issue https://github.com/safetensors/safetensors/issues/584, open; a fix
sorting the keys is proposed in https://github.com/safetensors/safetensors/pull/790).
Once a safetensors release writes sorted metadata, this module can go and callers
use `safetensors.torch.save_file` inside `formats.io.atomic_path`. Files whose bytes
need not repeat (training's resume scratch) already use the library writer.

This writer emits the same format
(8-byte little-endian header length, JSON header padded with spaces to a multiple
of 8, raw little-endian tensor data) with keys sorted and tensors laid out in
name order, so outputs are reproducible byte for byte. Any safetensors reader
loads the result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from csrtool.formats.io import atomic_path

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _DTYPES:
            raise TypeError(f"dtype {t.dtype} of {name} is not supported by safetensors")
        raw = _raw(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically and deterministically."""
    data = safetensors_bytes(tensors, metadata)
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
