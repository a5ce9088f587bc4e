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
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from csrtool.errors import CsrError
from csrtool.formats.io import atomic_path

DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the codec and the .csr format store


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
            if 0 in k.shape or 0 in v.shape:
                raise CsrError(f"{name}: layer {i} has an empty dimension (keys {list(k.shape)}, values {list(v.shape)}): save a cache with at least one batch row, KV head and channel")
            if k.dtype not in DTYPES or v.dtype not in DTYPES:
                raise CsrError(f"{name}: layer {i} has dtype {k.dtype}/{v.dtype}: csrtool reads float16, bfloat16 and float32 caches (convert it first)")
            if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                raise CsrError(f"{name}: layer {i} contains NaN or Inf values; refusing to compress a broken cache")
        return self


def save_cache(path: Path, cache: KVCache) -> None:
    """Write a csrtool cache file atomically; the same cache gives the same bytes."""
    data = {
        "keys": [k.detach().cpu().contiguous() for k in cache.keys],
        "values": [v.detach().cpu().contiguous() for v in cache.values],
        "meta": plain_meta(cache.meta),
    }
    with atomic_path(Path(path)) as tmp:
        # an open file, not a path: torch names the zip's root folder after a path's file name,
        # which here is a random temporary name; for a file object it is always "archive"
        with open(tmp, "wb") as fh:
            torch.save(data, fh)


def plain_meta(meta: object, name: str = "cache") -> dict:
    """Meta as plain JSON (string keys, finite numbers; other objects as strings), or CsrError."""
    if not isinstance(meta, dict):
        raise CsrError(f"{name}: meta must be a dict, got {type(meta).__name__}: save the cache with csrtool cache")
    bad = next((k for k in meta if not isinstance(k, str)), None)
    if bad is not None:
        raise CsrError(f"{name}: meta key {bad!r:.40} is not a string: save the cache with csrtool cache")
    try:
        return json.loads(json.dumps(meta, default=str, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError, RecursionError) as exc:
        raise CsrError(f"{name}: meta is not plain JSON ({str(exc)[:80]}): save the cache with csrtool cache") from None


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
        with warnings.catch_warnings():  # torch warns about pickle protocols of hostile files; the error below says it all
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=lazy and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" (it references {found.group(1)})" if found else ""
        raise CsrError(
            f"{path} needs arbitrary unpickling to load, which csrtool refuses for safety{what}: "
            "save the cache as plain tensors (csrtool cache, or a dict/tuple of tensors)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types on garbage input
        first = _clip((str(exc).splitlines() or [""])[0])
        raise CsrError(
            f"{path} is not a readable cache file ({type(exc).__name__}: {first}): pass a csrtool cache .pt, "
            "a tuple of (key, value) tensors saved with torch.save, or a safetensors cache"
        ) from None
    return from_object(obj, name=str(path)).validate(str(path))


def open_cache(path: Path) -> KVCache:
    """load_cache for streaming: tensors memory-mapped or read layer by layer."""
    return load_cache(path, lazy=True)


def _clip(text: str, n: int = 120) -> str:
    """At most n characters, cut at a word boundary with an ellipsis (never mid-word)."""
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " ..."


def from_object(obj: object, name: str = "cache") -> KVCache:
    """Accept the csrtool dict or the legacy tuple-of-(key, value) layout."""
    if isinstance(obj, dict) and "keys" in obj and "values" in obj:
        for part in ("keys", "values"):
            if not isinstance(obj[part], (list, tuple)):
                raise CsrError(f"{name}: '{part}' must be a list of tensors [B, H, T, D], got {type(obj[part]).__name__}: save the cache with csrtool cache")
        meta = obj.get("meta")
        return KVCache(list(obj["keys"]), list(obj["values"]), plain_meta({} if meta is None else meta, name))
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
    return KVCache(keys, values, plain_meta(meta, str(path))).validate(str(path))


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
