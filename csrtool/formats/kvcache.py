"""Saved KV caches: the `csrtool cache` file and the other layouts we read.

The csrtool cache file is a plain dict loadable with `torch.load(weights_only=True)`:

    {"keys": [L x Tensor[B, H, T, D]], "values": [L x Tensor[B, H, T, D]], "meta": {...}}

`meta` records model, dtype, key space ('post-rope' as transformers stores them),
rope parameters and the text source. We also read transformers' legacy
tuple-of-tuples `((k0, v0), (k1, v1), ...)` and safetensors files with tensors
`keys.{l}` / `values.{l}` (meta as JSON in the metadata key `meta`).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from csrtool.errors import CsrError
from csrtool.formats.io import atomic_path


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # L x [B, H, T, D]
    values: list[torch.Tensor]  # L x [B, H, T, D]
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B, H, T, D) of layer 0."""
        return tuple(self.keys[0].shape)  # type: ignore[return-value]

    def validate(self, name: str = "cache") -> "KVCache":
        """Check shapes agree and values are finite; raise CsrError otherwise."""
        if not self.keys or not self.values:
            raise CsrError(f"{name} is empty (no layers): save a cache with csrtool cache first")
        if len(self.keys) != len(self.values):
            raise CsrError(f"{name} has {len(self.keys)} key layers but {len(self.values)} value layers")
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
                raise CsrError(f"{name}: layer {i} does not hold tensors")
            if k.dim() != 4 or v.dim() != 4:
                raise CsrError(f"{name}: layer {i} tensors must be [batch, heads, tokens, head_dim], got {list(k.shape)} and {list(v.shape)}")
            if k.shape[:3] != v.shape[:3]:
                raise CsrError(f"{name}: layer {i} keys {list(k.shape)} and values {list(v.shape)} disagree")
            if k.shape[2] == 0:
                raise CsrError(f"{name} is empty (0 tokens in layer {i})")
            if not k.is_floating_point() or not v.is_floating_point():
                raise CsrError(f"{name}: layer {i} is not floating point ({k.dtype})")
            if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                raise CsrError(f"{name}: layer {i} contains NaN or Inf values; refusing to compress a broken cache")
        return self


def save_cache(path: Path, cache: KVCache) -> None:
    """Write a csrtool cache file atomically."""
    data = {
        "keys": [k.detach().cpu().contiguous() for k in cache.keys],
        "values": [v.detach().cpu().contiguous() for v in cache.values],
        "meta": _plain(cache.meta),
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(data, tmp)


def _plain(meta: dict) -> dict:
    """Meta restricted to JSON types, so weights_only loading accepts it."""
    return json.loads(json.dumps(meta, default=str))


def load_cache(path: Path, lazy: bool = False) -> KVCache:
    """Read a cache in any supported layout; validate it. Never unpickles code.

    lazy=True memory-maps .pt files and reads safetensors tensors one at a time,
    so streaming commands keep memory bounded by one layer."""
    path = Path(path)
    if not path.is_file():
        raise CsrError(f"cache file {path} not found")
    if _looks_safetensors(path):
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CsrError(
            f"{path} needs arbitrary unpickling to load, which csrtool refuses for safety ({str(exc).splitlines()[0][:120]}): "
            "save the cache as plain tensors (csrtool cache, or a dict/tuple of tensors)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage input
        first = (str(exc).splitlines() or [""])[0][:120]
        raise CsrError(
            f"{path} is not a readable cache file ({type(exc).__name__}: {first}): pass a csrtool cache .pt, "
            "a tuple of (key, value) tensors saved with torch.save, or a safetensors cache"
        ) from None
    return from_object(obj, name=str(path)).validate(str(path))


def open_cache(path: Path) -> KVCache:
    """load_cache for streaming: tensors memory-mapped or read layer by layer."""
    return load_cache(path, lazy=True)


def from_object(obj: object, name: str = "cache") -> KVCache:
    """Accept the csrtool dict or the legacy tuple-of-(key, value) layout."""
    if isinstance(obj, dict) and "keys" in obj and "values" in obj:
        keys, values = list(obj["keys"]), list(obj["values"])
        meta = obj.get("meta") or {}
        return KVCache(keys, values, dict(meta))
    if isinstance(obj, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) >= 2 for p in obj):
        return KVCache([p[0] for p in obj], [p[1] for p in obj], {"source_format": "legacy-tuple"})
    raise CsrError(
        f"{name}: unknown cache layout ({type(obj).__name__}); expected csrtool's "
        "{'keys': [...], 'values': [...]} dict, a tuple of (key, value) pairs, or a safetensors file"
    )


def _looks_safetensors(path: Path) -> bool:
    with open(path, "rb") as fh:
        raw = fh.read(9)
    if len(raw) < 9:
        return False
    n = int.from_bytes(raw[:8], "little")
    return raw[8:9] == b"{" and 0 < n < 100_000_000


class _LazyTensors(Sequence):
    """Tensors of a safetensors file read one at a time (bounded memory)."""

    def __init__(self, fh, names: list[str]) -> None:
        self.fh, self.names = fh, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.fh.get_tensor(self.names[i])


def _load_safetensors(path: Path) -> KVCache:
    """A safetensors cache whose tensors are read one at a time, when indexed."""
    from safetensors import SafetensorError, safe_open

    try:
        fh = safe_open(str(path), framework="pt")
        names = set(fh.keys())
        meta = json.loads((fh.metadata() or {}).get("meta", "{}"))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CsrError(f"{path} is not a readable safetensors cache ({exc})") from None
    n = len([x for x in names if x.startswith("keys.")])
    if not all(f"keys.{i}" in names and f"values.{i}" in names for i in range(n)):
        raise CsrError(f"{path}: a safetensors cache needs tensors keys.0..keys.{{L-1}} and values.0..values.{{L-1}}")
    keys = _LazyTensors(fh, [f"keys.{i}" for i in range(n)])
    values = _LazyTensors(fh, [f"values.{i}" for i in range(n)])
    return KVCache(keys, values, meta).validate(str(path))


def to_dynamic_cache(cache: KVCache, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """Build a transformers DynamicCache (what `model.generate(past_key_values=...)` takes)."""
    from transformers import DynamicCache

    pairs = [(k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in zip(cache.keys, cache.values)]
    return DynamicCache(pairs)


def from_dynamic_cache(dc, meta: dict | None = None) -> KVCache:
    """Copy the tensors out of a transformers DynamicCache."""
    keys = [layer.keys.detach().clone() for layer in dc.layers]
    values = [layer.values.detach().clone() for layer in dc.layers]
    return KVCache(keys, values, dict(meta or {}))
