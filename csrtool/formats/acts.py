"""Activation sets: what `csrtool collect` writes and `csrtool train-dict` reads.

ACTS_DIR/
  manifest.json              {"format": "csrtool-acts", "version": 1, "model", "dtype",
                              "store_dtype", "key_space", "seq_len", "tokens", "text_source",
                              "layers", "num_kv_heads", "head_dim", "shards": [...]}
  shard-00000.safetensors    tensors `layer.{l}.k` and `layer.{l}.v`, each [T, H, D], and `ids` [T]
                             (int64, the tokens they came from; older sets lack it)
  ...                        (same layers in every shard; shards concatenate along T)

Shards are flushed as they fill so memory stays bounded; the manifest is written
last, so a directory without one is an interrupted collection.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open

from csrtool.errors import CsrError
from csrtool.formats.io import atomic_write_bytes
from csrtool.formats.dicts import dict_name as tensor_name  # activations and dictionaries name tensors alike
from csrtool.formats.stwrite import save_safetensors

FORMAT = "csrtool-acts"
VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids"  # shard tensor: the token id of each row


class ActsWriter:
    """Accumulate [T, H, D] blocks per layer and kind; flush a shard every `shard_tokens`."""

    def __init__(self, out_dir: Path, meta: dict, shard_tokens: int = 8192, store_dtype: torch.dtype = torch.float16,
                 prefix: str = "shard-"):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.shard_tokens = shard_tokens
        self.store_dtype = store_dtype
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.pending_tokens = 0
        self.tokens = 0
        self.shards: list[str] = []
        self.prefix = prefix  # shard names: {prefix}00000.safetensors, ...

    def add(self, blocks: dict[tuple[int, str], torch.Tensor], ids: torch.Tensor | None = None) -> None:
        """blocks[(layer, kind)] = [T, H, D] for one window (same T for all); ids [T] its token ids."""
        if ids is not None:
            self.pending.setdefault(IDS, []).append(ids.detach().to("cpu", torch.int64).reshape(-1))
        t = None
        for (layer, kind), x in blocks.items():
            self.pending.setdefault(tensor_name(layer, kind), []).append(x.detach().to("cpu", self.store_dtype))
            t = x.shape[0]
        self.pending_tokens += t or 0
        self.tokens += t or 0
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self.pending_tokens:
            return
        name = f"{self.prefix}{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in sorted(self.pending.items())}
        save_safetensors(self.dir / name, tensors, {"format": FORMAT})
        self.shards.append(name)
        self.pending, self.pending_tokens = {}, 0

    def close(self) -> dict:
        """Flush and write the manifest (last, atomically). Returns the manifest."""
        self.flush()
        manifest = {
            **self.meta,
            "format": FORMAT,
            "version": VERSION,
            "tokens": self.tokens,
            "store_dtype": str(self.store_dtype).removeprefix("torch."),
            "shards": self.shards,
        }
        atomic_write_bytes(self.dir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return manifest


class ActsReader:
    """Read an activation directory written by ActsWriter."""

    def __init__(self, acts_dir: Path):
        self.dir = Path(acts_dir)
        mpath = self.dir / MANIFEST
        if not self.dir.is_dir():
            raise CsrError(f"activation directory {self.dir} not found: create it with csrtool collect -o {self.dir}")
        if not mpath.is_file():
            raise CsrError(f"{self.dir} has no {MANIFEST} (not a csrtool collect output, or the collection was interrupted): re-run csrtool collect")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CsrError(f"{mpath} is corrupted: re-run csrtool collect") from None
        if self.manifest.get("format") != FORMAT:
            raise CsrError(f"{mpath} is not a csrtool activation manifest")

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.manifest["num_kv_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.manifest["head_dim"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["tokens"])

    def ids(self, shards: list[str] | None = None) -> torch.Tensor | None:
        """The token ids [T] of the stored rows (of `shards` only, if given); None for sets collected without them.
        All of them are read once per reader (train-dict's checks and its training share the read)."""
        if shards is None:
            if not hasattr(self, "_ids"):
                self._ids = self._read_ids(self.manifest["shards"])
            return self._ids
        return self._read_ids(shards)

    def _read_ids(self, shards: list[str]) -> torch.Tensor | None:
        parts = []
        for shard in shards:
            try:
                with safe_open(str(self.dir / shard), framework="pt") as fh:
                    if IDS not in fh.keys():
                        return None
                    parts.append(fh.get_tensor(IDS).to(torch.int64))
            except (SafetensorError, OSError) as exc:
                raise CsrError(f"{self.dir / shard} is unreadable ({exc}): re-run csrtool collect") from None
        return torch.cat(parts) if parts else None

    def load(self, layer: int, kind: str, max_tokens: int | None = None, shards: list[str] | None = None) -> torch.Tensor:
        """All stored tokens of one layer and kind as float32 [T, H, D] (of `shards` only, if given)."""
        name = tensor_name(layer, kind)
        parts, have = [], 0
        for shard in self.manifest["shards"] if shards is None else shards:
            try:
                with safe_open(str(self.dir / shard), framework="pt") as fh:
                    if name not in fh.keys():
                        raise CsrError(f"{self.dir / shard} has no tensor {name}: was layer {layer} collected? (see --layers)")
                    parts.append(fh.get_tensor(name).float())
            except (SafetensorError, OSError) as exc:
                raise CsrError(f"{self.dir / shard} is unreadable ({exc}): re-run csrtool collect") from None
            have += parts[-1].shape[0]
            if max_tokens is not None and have >= max_tokens:
                break
        x = torch.cat(parts)
        return x[:max_tokens] if max_tokens is not None else x
