"""The `.csr` file: header, layer sections, SHA-256 trailer (docs/format.md).

    check_fit(cache, dicts) -> (shapes, G, C)    the dictionaries fit the cache, or CsrError
    make_header(cache, dicts, cfg) -> CsrHeader
    write_csr(path, header, sections)        sections: iterable of (key bytes, value bytes) per layer
    open_csr(path) -> CsrReader              verifies everything before any payload is decoded
    CsrReader.layers(dicts) -> iter of (l, k, v)   decoded layer by layer (bounded memory)
    read_csr(path, dicts) -> KVCache
    scratch_layers(output, header) -> (keys, values)   memory-mapped tensors to decode into

Every problem with a file is a CsrError; no length is trusted before it has been
checked against the file size and the checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from csrtool import codec
from csrtool.formats.dicts import DictSet
from csrtool.engine import packing
from csrtool.errors import CsrError
from csrtool.formats.io import atomic_path, scratch_path
from csrtool.formats.kvcache import KVCache

MAGIC = b"\x89CSR\r\n\x1a\n"
VERSION = 2  # version 1 files (one sparsity for all layers) are still read and written
FORMAT = "csrtool-csr"
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header_len
DIGEST = 32
MAX_HEADER = 16 << 20
_BLOCK = 1 << 20
_MAX_DIM = 1 << 31


@dataclass(frozen=True)
class CsrHeader:
    dtype: str
    layers: tuple[tuple[int, int, int, int, int], ...]  # per layer (B, H, T, Dk, Dv)
    n_atoms: int
    config: codec.CodecConfig
    value_split: int
    key_space: str
    cache_key_space: str
    dict_fingerprint: str
    dict_scope: str
    dict_groups: int
    model: str | None = None
    rope: dict | None = None
    meta: dict = field(default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return codec.DTYPES[self.dtype]

    def shapes(self, layer: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        b, h, t, dk, dv = self.layers[layer]
        return (b, h, t, dk), (b, h, t, dv)

    def section_sizes(self, layer: int) -> tuple[int, int]:
        sk, sv = self.shapes(layer)
        cfg = self.config.for_layer(layer)
        c, n, w, dt, s = cfg.coef, self.n_atoms, cfg.window, self.torch_dtype, cfg.sink
        return (
            codec.section_nbytes(sk, n, 1, cfg.sparsity_k, c, w, dt, s),
            codec.section_nbytes(sv, n, self.value_split, cfg.sparsity_v, c, w, dt, s),
        )

    @property
    def version(self) -> int:
        """1 for one sparsity for all layers, 2 with per-layer sparsities (docs/format.md §2)."""
        return 1 if self.config.layer_sparsity is None else 2

    @property
    def payload_nbytes(self) -> int:
        return sum(sum(self.section_sizes(i)) for i in range(len(self.layers)))

    @property
    def n_channels(self) -> int:
        """Channels in the cache: sum over layers of B*H*T*(Dk+Dv)."""
        return sum(b * h * t * (dk + dv) for b, h, t, dk, dv in self.layers)

    @property
    def n_tokens(self) -> int:
        return max(t for _, _, t, _, _ in self.layers)

    def to_json(self) -> dict:
        obj = {
            "format": FORMAT,
            "version": self.version,
            "model": self.model,
            "dtype": self.dtype,
            "layers": [list(x) for x in self.layers],
            "codec": {
                "n_atoms": self.n_atoms,
                "index_bits": packing.index_bits(self.n_atoms),
                "sparsity_k": self.config.sparsity_k,
                "sparsity_v": self.config.sparsity_v,
                "value_split": self.value_split,
                "coef": self.config.coef,
                "method": self.config.method,
                "window": self.config.window,
                "sink": self.config.sink,
                "key_space": self.key_space,
                "cache_key_space": self.cache_key_space,
            },
            "dicts": {"fingerprint": self.dict_fingerprint, "scope": self.dict_scope, "n_groups": self.dict_groups},
            "rope": self.rope,
            "meta": self.meta,
        }
        if self.config.layer_sparsity is not None:
            obj["codec"]["layer_sparsity"] = [list(p) for p in self.config.layer_sparsity]
        return obj

    def encode(self) -> bytes:
        """Preamble and canonical JSON header (docs/format.md §1-2)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        body = text.encode("ascii")
        return PREAMBLE.pack(MAGIC, self.version, 0, len(body)) + body

    @property
    def file_nbytes(self) -> int:
        return len(self.encode()) + self.payload_nbytes + DIGEST


# ---------------------------------------------------------------- header from JSON


def _int(obj: dict, key: str, lo: int, hi: int = _MAX_DIM) -> int:
    val = obj.get(key)
    if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
        raise ValueError(f"{key}={val!r}")
    return val


def _choice(obj: dict, key: str, options: Iterable[str]) -> str:
    val = obj.get(key)
    if val not in tuple(options):
        raise ValueError(f"{key}={val!r}")
    return val


def header_from_json(obj: object) -> CsrHeader:
    """Validate a parsed header; ValueError/KeyError/TypeError on anything invalid."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") not in (1, 2):
        raise ValueError("format/version")
    cd, dd = obj["codec"], obj["dicts"]
    if not isinstance(cd, dict) or not isinstance(dd, dict):
        raise ValueError("codec/dicts")
    n_atoms = _int(cd, "n_atoms", 2, 1 << 24)
    if cd.get("index_bits") != packing.index_bits(n_atoms):
        raise ValueError("index_bits")
    value_split = _int(cd, "value_split", 1, 1 << 16)
    per_layer = None
    if obj["version"] == 2:
        rows = cd["layer_sparsity"]
        if not isinstance(rows, list) or not isinstance(obj.get("layers"), list) or len(rows) != len(obj["layers"]):
            raise ValueError("layer_sparsity")
        pairs = []
        for r in rows:
            if not isinstance(r, list) or len(r) != 2:
                raise ValueError("layer_sparsity row")
            pairs.append(tuple(_int({"x": v}, "x", 1, 1 << 16) for v in r))
        per_layer = tuple(pairs)
    elif "layer_sparsity" in cd:
        raise ValueError("layer_sparsity in a version 1 header")
    cfg = codec.CodecConfig(
        sparsity_k=_int(cd, "sparsity_k", 1, 1 << 16),
        sparsity_v=_int(cd, "sparsity_v", 1, 1 << 16),
        coef=_choice(cd, "coef", codec.COEF_FORMATS),
        method=_choice(cd, "method", codec.METHODS),
        window=_int(cd, "window", 0),
        sink=_int(cd, "sink", 0),
        layer_sparsity=per_layer,
    )
    layers = []
    if not isinstance(obj["layers"], list) or not obj["layers"]:
        raise ValueError("layers")
    for row in obj["layers"]:
        if not isinstance(row, list) or len(row) != 5:
            raise ValueError("layer row")
        vals = _int({"x": row[0]}, "x", 1), *(_int({"x": r}, "x", 1) for r in row[1:])
        if vals[4] % value_split:
            raise ValueError("value head_dim not divisible by value_split")
        layers.append(tuple(vals))
    rope_p = obj.get("rope")
    if rope_p is not None:
        if not isinstance(rope_p, dict) or not isinstance(rope_p.get("inv_freq"), list):
            raise ValueError("rope")
        if not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in rope_p["inv_freq"]):
            raise ValueError("rope.inv_freq")
        if not isinstance(rope_p.get("scaling"), (int, float)) or not isinstance(rope_p.get("position_offset"), int):
            raise ValueError("rope scaling/offset")
    key_space = _choice(cd, "key_space", codec.KEY_SPACES)
    cache_key_space = _choice(cd, "cache_key_space", codec.KEY_SPACES)
    if key_space != cache_key_space and rope_p is None:
        raise ValueError("rope missing")
    model, meta, fp = obj.get("model"), obj.get("meta", {}), dd.get("fingerprint")
    if not (model is None or isinstance(model, str)) or not isinstance(meta, dict) or not isinstance(fp, str):
        raise ValueError("model/meta/fingerprint")
    return CsrHeader(
        dtype=_choice(obj, "dtype", codec.DTYPES),
        layers=tuple(layers),
        n_atoms=n_atoms,
        config=cfg,
        value_split=value_split,
        key_space=key_space,
        cache_key_space=cache_key_space,
        dict_fingerprint=fp,
        dict_scope=_choice(dd, "scope", ("head", "layer")),
        dict_groups=_int(dd, "n_groups", 1),
        model=model,
        rope=rope_p,
        meta=meta,
    )


# ---------------------------------------------------------------- building


def check_fit(cache: KVCache, dicts: DictSet) -> tuple[list[tuple[int, ...]], int, int]:
    """Check the dictionaries fit the cache: (per-layer shapes, head groups G, value split C)."""
    n_atoms = dicts.n_atoms
    dtype = cache.keys[0].dtype
    if dtype not in codec.DTYPE_NAMES:
        raise CsrError(f"cache dtype {dtype} is not supported: use float16, bfloat16 or float32")
    layers, groups, split = [], set(), set()
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        ak, av = dicts.get(i, "k"), dicts.get(i, "v")
        if k.dtype != dtype or v.dtype != dtype:
            raise CsrError(f"cache layer {i} has dtype {k.dtype}/{v.dtype} but layer 0 has {dtype}: save the cache with one dtype")
        if ak.shape[2] != n_atoms or av.shape[2] != n_atoms:
            raise CsrError(f"dictionary layer {i} has {ak.shape[2]}/{av.shape[2]} atoms, others {n_atoms}: .csr needs one atom count")
        codec._check_atoms(tuple(k.shape), ak, f"cache's keys (layer {i})")
        codec._check_atoms(tuple(v.shape), av, f"cache's values (layer {i})")
        groups.update({ak.shape[0], av.shape[0]})
        split.add(av.shape[1])
        b, h, t, dk = k.shape
        layers.append((b, h, t, dk, v.shape[3]))
    if len(groups) != 1 or len(split) != 1:
        raise CsrError("the dictionary file mixes head/layer scopes or value splits across layers: re-run csrtool train-dict")
    return layers, groups.pop(), split.pop()


def make_header(cache: KVCache, dicts: DictSet, cfg: codec.CodecConfig) -> CsrHeader:
    """Header for compressing `cache` with `dicts`; checks they fit together."""
    layers, g, value_split = check_fit(cache, dicts)
    dtype = cache.keys[0].dtype
    n_atoms = dicts.n_atoms
    scope = "head" if g == layers[0][1] and g > 1 else "layer"
    key_space = dicts.source.get("key_space", "post-rope")
    cache_key_space = cache.meta.get("key_space", "post-rope")
    if key_space not in codec.KEY_SPACES or cache_key_space not in codec.KEY_SPACES:
        raise CsrError(f"unknown key space {key_space!r}/{cache_key_space!r}: expected 'pre-rope' or 'post-rope'")
    rope_p = None
    if key_space != cache_key_space:
        rope_p = codec.rope_params(cache.meta, layers[0][2])
        if len(rope_p["inv_freq"]) * 2 != layers[0][3]:
            raise CsrError(f"cache meta rope covers {2 * len(rope_p['inv_freq'])} channels but keys have {layers[0][3]}: the cache meta is inconsistent")
    model = cache.meta.get("model")
    return CsrHeader(
        dtype=codec.DTYPE_NAMES[dtype],
        layers=tuple(layers),
        n_atoms=n_atoms,
        config=cfg,
        value_split=value_split,
        key_space=key_space,
        cache_key_space=cache_key_space,
        dict_fingerprint=dicts.fingerprint,
        dict_scope=scope,
        dict_groups=g,
        model=model if isinstance(model, str) else None,
        rope=rope_p,
        meta=json.loads(json.dumps(cache.meta, default=str, allow_nan=False, sort_keys=True)),
    )


def encode_sections(cache: KVCache, dicts: DictSet, header: CsrHeader) -> Iterator[tuple[bytes, bytes]]:
    """Per layer (key bytes, value bytes), computed lazily one layer at a time."""
    for i in range(len(header.layers)):
        k, v = cache.keys[i], cache.values[i]
        yield codec.encode_layer(
            k, v, dicts.get(i, "k"), dicts.get(i, "v"), header.config.for_layer(i), header.key_space, header.cache_key_space, header.rope,
            (dicts.mean(i, "k"), dicts.mean(i, "v")),
        )


def write_csr(path: Path, header: CsrHeader, sections: Iterable[tuple[bytes, bytes]], on_layer: Callable[[int], None] | None = None) -> int:
    """Write atomically: nothing appears under `path` unless every byte was written. Returns the size."""
    head = header.encode()
    h = hashlib.sha256(head)
    size = len(head)
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(head)
            n = 0
            for i, (kb, vb) in enumerate(sections):
                assert (len(kb), len(vb)) == header.section_sizes(i), (i, len(kb), len(vb), header.section_sizes(i))
                for part in (kb, vb):
                    h.update(part)
                    fh.write(part)
                    size += len(part)
                n += 1
                if on_layer is not None:
                    on_layer(i)
            assert n == len(header.layers), (n, len(header.layers))
            fh.write(h.digest())
            fh.flush()
            os.fsync(fh.fileno())
    return size + DIGEST


# ---------------------------------------------------------------- reading


class CsrReader:
    """An opened, fully verified .csr file; decode layer by layer."""

    def __init__(self, path: Path, header: CsrHeader, header_end: int, size: int) -> None:
        self.path, self.header, self.header_end, self.size = path, header, header_end, size

    def check_dicts(self, dicts: DictSet) -> None:
        hd = self.header
        if dicts.fingerprint != hd.dict_fingerprint:
            raise CsrError(
                f"dictionary mismatch: {self.path} was compressed with dictionary {hd.dict_fingerprint[:16]}, "
                f"the given one is {dicts.fingerprint[:16]}: pass the dictionary file used by csrtool compress"
            )
        for i in range(len(hd.layers)):
            sk, sv = hd.shapes(i)
            for kind, shape, chunks in (("k", sk, 1), ("v", sv, hd.value_split)):
                a = dicts.get(i, kind)
                if tuple(a.shape) != (hd.dict_groups, chunks, hd.n_atoms, shape[3] // chunks):
                    raise CsrError(f"dictionary/cache shape mismatch in layer {i} ({kind}): dictionary {list(a.shape)}, file needs [{hd.dict_groups}, {chunks}, {hd.n_atoms}, {shape[3] // chunks}]")

    def sections(self) -> Iterator[tuple[int, bytes, bytes]]:
        with open(self.path, "rb") as fh:
            fh.seek(self.header_end)
            for i in range(len(self.header.layers)):
                nk, nv = self.header.section_sizes(i)
                kb, vb = fh.read(nk), fh.read(nv)
                if len(kb) != nk or len(vb) != nv:
                    raise CsrError(f"{self.path} changed while being read (truncated): read it again")
                yield i, kb, vb

    def layers(self, dicts: DictSet) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer, keys, values) in the original dtype, one layer at a time."""
        self.check_dicts(dicts)
        hd = self.header
        for i, kb, vb in self.sections():
            sk, sv = hd.shapes(i)
            try:
                k, v = codec.decode_layer(
                    kb, vb, sk, sv, dicts.get(i, "k"), dicts.get(i, "v"), hd.config.for_layer(i),
                    hd.key_space, hd.cache_key_space, hd.rope, hd.torch_dtype, (dicts.mean(i, "k"), dicts.mean(i, "v")),
                )
            except CsrError as exc:
                raise CsrError(f"{self.path} layer {i}: {exc}") from None
            yield i, k, v


def open_csr(path: Path) -> CsrReader:
    """Check magic, version, sizes and the SHA-256 of the whole file (docs/format.md §1)."""
    path = Path(path)
    if not path.is_file():
        raise CsrError(f"{path} not found: pass a file written by csrtool compress")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        pre = fh.read(PREAMBLE.size)
        if len(pre) >= 8 and pre[:8] != MAGIC:
            raise CsrError(f"{path} is not a .csr file (bad magic): pass a file written by csrtool compress")
        if size < PREAMBLE.size + DIGEST:
            raise CsrError(f"{path} is truncated ({size} bytes, a .csr file has at least {PREAMBLE.size + DIGEST}): compress the cache again")
        _, version, flags, hlen = PREAMBLE.unpack(pre)
        if version > VERSION:
            raise CsrError(f"{path} has .csr format version {version}, newer than this csrtool ({VERSION}): upgrade csrtool")
        if version == 0 or flags != 0:
            raise CsrError(f"{path} is corrupted (format version {version}, flags {flags}): compress the cache again")
        if not 2 <= hlen <= MAX_HEADER:
            raise CsrError(f"{path} is corrupted (header length {hlen}): compress the cache again")
        if PREAMBLE.size + hlen + DIGEST > size:
            raise CsrError(f"{path} is truncated (header of {hlen} bytes but the file has {size}): compress the cache again")
        raw = fh.read(hlen)
        header = _parse_header(raw)
        digest = hashlib.sha256(pre + raw)
        remaining = size - DIGEST - PREAMBLE.size - hlen
        while remaining > 0:
            block = fh.read(min(_BLOCK, remaining))
            if not block:
                break
            digest.update(block)
            remaining -= len(block)
        stored = fh.read(DIGEST)
    expected = None if header is None else PREAMBLE.size + hlen + header.payload_nbytes + DIGEST
    if remaining or stored != digest.digest() or len(stored) != DIGEST:
        if expected is not None and size < expected:
            raise CsrError(f"{path} is truncated (expected {expected} bytes, found {size}): compress the cache again")
        raise CsrError(f"{path} is corrupted (checksum mismatch): compress the cache again")
    if header is None or header.version != version:
        raise CsrError(f"{path} is corrupted (invalid header): compress the cache again")
    if size != expected:
        raise CsrError(f"{path} is corrupted (size {size} bytes, the header implies {expected}): compress the cache again")
    return CsrReader(path, header, PREAMBLE.size + hlen, size)


def _parse_header(raw: bytes) -> CsrHeader | None:
    try:
        return header_from_json(json.loads(raw.decode("ascii")))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, CsrError, RecursionError):
        return None


def read_csr(path: Path, dicts: DictSet) -> KVCache:
    """Decode a whole .csr file into a KVCache (meta from the header)."""
    reader = open_csr(path)
    keys, values = [], []
    for _, k, v in reader.layers(dicts):
        keys.append(k)
        values.append(v)
    return KVCache(keys, values, dict(reader.header.meta))


@contextlib.contextmanager
def scratch_layers(output: Path, hd: CsrHeader):
    """Per-layer (keys, values) tensors for decoding into, backed by a memory-mapped scratch file
    beside `output` (so a cache larger than RAM can be rebuilt), removed afterwards."""
    dtype = hd.torch_dtype
    shapes = [s for i in range(len(hd.layers)) for s in hd.shapes(i)]
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    with scratch_path(output) as scratch:  # unnamed on Linux: cannot outlive the process
        storage = torch.from_file(str(scratch), shared=True, size=max(total, 1), dtype=dtype)
        tensors, pos = [], 0
        for s in shapes:
            n = int(torch.Size(s).numel())
            tensors.append(storage[pos : pos + n].view(s))
            pos += n
        yield tensors[0::2], tensors[1::2]


def size_report(header: CsrHeader, file_nbytes: int, dict_nbytes: int | None = None) -> dict:
    """Sizes and bits per channel of a .csr file (see docs/format.md §5)."""
    ch = header.n_channels
    head = file_nbytes - header.payload_nbytes - DIGEST
    if dict_nbytes is None:
        dict_nbytes = sum(4 * header.dict_groups * header.n_atoms * (dk + dv) for _, _, _, dk, dv in header.layers)
    elem = torch.empty((), dtype=header.torch_dtype).element_size()
    n = len(header.layers)
    cfgs = [header.config.for_layer(i) for i in range(n)]
    d_k = header.layers[0][3]
    k_bits = sum(codec.vector_bits(header.n_atoms, c.sparsity_k, 1, c.coef) for c in cfgs) / n / d_k
    v_bits = sum(codec.vector_bits(header.n_atoms, c.sparsity_v, header.value_split, c.coef) for c in cfgs) / n / header.layers[0][4]
    return {
        "file_bytes": file_nbytes,
        "header_bytes": head,
        "payload_bytes": header.payload_nbytes,
        "checksum_bytes": DIGEST,
        "dict_bytes": dict_nbytes,
        "channels": ch,
        "tokens": header.n_tokens,
        "code_bits_per_channel": {"k": k_bits, "v": v_bits, "avg": (k_bits + v_bits) / 2},
        "bits_per_channel": {
            "payload": 8 * header.payload_nbytes / ch,
            "with_header": 8 * file_nbytes / ch,
            "with_dict": 8 * (file_nbytes + dict_nbytes) / ch,
        },
        "ratio_vs_fp16": 2 * ch / file_nbytes,
        f"ratio_vs_{header.dtype}": elem * ch / file_nbytes,
        "ratio_vs_original": elem * ch / file_nbytes,
        "original_bytes": elem * ch,
    }


__all__ = [
    "CsrHeader", "CsrReader", "MAGIC", "VERSION", "make_header", "encode_sections", "write_csr", "open_csr",
    "read_csr", "scratch_layers", "size_report",
]
