"""The `.csr` file: header, layer sections, SHA-256 trailer (docs/format.md).

The header lives in formats/csrheader.py, the section bytes in formats/csrsection.py;
this module frames them and reads them back.

    check_fit(cache, dicts) -> (shapes, G, C)    the dictionaries fit the cache, or CsrError
    make_header(cache, dicts, cfg) -> CsrHeader
    write_csr(path, header, sections)        sections: iterable of (key bytes, value bytes) per layer
    layer_bytes(header, l, ck, cv) -> (key bytes, value bytes)   codec.SectionCodes -> bytes, parsed back
    open_csr(path) -> CsrReader              verifies everything before any payload is decoded
    CsrReader.layers(dicts) -> iter of (l, k, v)   decoded layer by layer (bounded memory)
    read_csr(path, dicts) -> KVCache
    scratch_layers(output, header) -> (keys, values)   memory-mapped tensors to decode into

Every problem with a file is a CsrError; no length is trusted before it has been
checked against the file size and the checksum, and the bytes decoded are the bytes
verified (CsrReader.sections hashes what it hands out and compares with the digest
open_csr checked).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.formats.csrheader import DIGEST, MAGIC, MAX_HEADER, PREAMBLE, VERSION, CsrHeader, parse_header
from csrtool.formats.csrsection import parse_section, section_bytes
from csrtool.formats.dicts import DictSet
from csrtool.formats.io import atomic_path, scratch_path
from csrtool.formats.kvcache import KVCache, plain_meta

_BLOCK = 1 << 20


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
        if 0 in (b, h, t, dk, v.shape[3]):
            raise CsrError(f"cache layer {i} has an empty dimension (keys {list(k.shape)}, values {list(v.shape)}): nothing to compress, save a non-empty cache")
        layers.append((b, h, t, dk, v.shape[3]))
    if len(groups) != 1 or len(split) != 1:
        raise CsrError("the dictionary file mixes head/layer scopes or value splits across layers: re-run csrtool train-dict")
    return layers, groups.pop(), split.pop()


def make_header(cache: KVCache, dicts: DictSet, cfg: codec.CodecConfig) -> CsrHeader:
    """Header for compressing `cache` with `dicts`; checks they fit together and that the codes can work."""
    layers, g, value_split = check_fit(cache, dicts)
    dtype = cache.keys[0].dtype
    n_atoms = dicts.n_atoms
    if cfg.layer_sparsity is not None and len(cfg.layer_sparsity) != len(layers):
        raise CsrError(f"the per-layer sparsity plan has {len(cfg.layer_sparsity)} layers but the cache has {len(layers)}: plan for this cache")
    for i, (_, _, _, dk, dv) in enumerate(layers):
        c = cfg.for_layer(i)
        codec.check_sparsity(c.sparsity_k, dk, f"layer {i} keys", n_atoms)
        codec.check_sparsity(c.sparsity_v, dv // value_split, f"layer {i} values (chunks of {dv // value_split})", n_atoms)
    scope = "head" if g == layers[0][1] and g > 1 else "layer"
    key_space = dicts.source.get("key_space", "post-rope")
    cache_key_space = cache.meta.get("key_space", "post-rope")
    if key_space not in codec.KEY_SPACES or cache_key_space not in codec.KEY_SPACES:
        raise CsrError(f"unknown key space {key_space!r:.40}/{cache_key_space!r:.40}: expected 'pre-rope' or 'post-rope'")
    rope_p = None
    if key_space != cache_key_space:
        rope_p = codec.RopeParams.from_meta(cache.meta)
        try:
            rope_p.check_layers(len(layers), "cache meta.rope")
        except CsrError as exc:
            raise CsrError(f"{exc}: the cache meta is inconsistent, save the cache again with csrtool cache") from None
        for i, (_, _, _, dk, _) in enumerate(layers):
            if len(rope_p.inv_freq) * 2 != dk:
                raise CsrError(f"cache meta rope covers {2 * len(rope_p.inv_freq)} channels but layer {i} keys have {dk}: the cache meta is inconsistent")
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
        meta=_header_meta(cache.meta, dicts),
    )


def _header_meta(meta: dict, dicts: DictSet) -> dict:
    """The cache's meta for the header; its token ids (`ids`, ~6 bytes a token) only where decoding needs them
    (dictionaries trained with the token predictor), so a plain file stays as small as its codes allow."""
    plain = plain_meta(meta)
    if not dicts.predicted:
        plain.pop("ids", None)
    return plain


def _token_ids(dicts: DictSet, predictor, header: CsrHeader) -> torch.Tensor | None:
    """The cache's token ids [B, T] (from the header's meta) when the dictionaries were trained with the token predictor, else None."""
    if not dicts.predicted:
        return None
    from csrtool.predictor import cache_ids

    if predictor is None:
        raise CsrError("these dictionaries were trained with the token predictor (train-dict's default): the model is needed to code or decode with them")
    b, _, t, _, _ = header.layers[0]
    return cache_ids(header.meta, b, t, predictor.vocab)


def _offsets(dicts: DictSet, predictor, header: CsrHeader, i: int, ids: torch.Tensor | None, decoded=None) -> tuple:
    """What layer i's coding subtracts from its (keys, values): the dictionaries' means, or, with the cache's
    token ids (_token_ids), the means plus each coded token's prediction; with cross-layer maps (`decoded`, a
    csrtool.crosslayer.Decoded holding the layers coded before), a function per side that adds the prediction
    from the decoded layers below (and the layer's own keys), called when its inputs are decoded."""
    cfg = header.config.for_layer(i)
    s, tc, _ = codec.spans(header.layers[i][2], cfg.window, cfg.sink)
    if ids is None:
        base = dicts.mean(i, "k"), dicts.mean(i, "v")
    else:
        from csrtool.predictor import offset

        head = ids[:, : s + tc]  # the coded tokens are its last tc
        base = offset(dicts, predictor, i, "k", head, tc), offset(dicts, predictor, i, "v", head, tc)
    if decoded is None:
        return base
    from csrtool import crosslayer

    def side(kind: str, mean: torch.Tensor | None):
        w = dicts.xmap(i, kind)
        if w is None:
            return mean

        return lambda: codec.shift(crosslayer.offset(w, decoded, i, kind, s, tc, depth=dicts.cross_depth), mean, 1.0)

    return side("k", base[0]), side("v", base[1])


def _cross_store(header: CsrHeader, i: int, decoded):
    """`decoded` for codec.encode_layer / decode_layer: keeps layer i's decoded sides for the layer above (None without cross-layer maps)."""
    if decoded is None:
        return None
    cfg = header.config.for_layer(i)
    s, _, _ = codec.spans(header.layers[i][2], cfg.window, cfg.sink)
    return lambda kind, x: decoded.put(i, kind, s, x)


def _decoded_store(dicts: DictSet):
    if not dicts.cross_layer:
        return None
    from csrtool.crosslayer import Decoded

    return Decoded()


def encode_sections(cache: KVCache, dicts: DictSet, header: CsrHeader, predictor=None) -> Iterator[tuple[bytes, bytes]]:
    """Per layer (key bytes, value bytes), computed lazily one layer at a time.

    Each section is parsed back before it is handed out: nothing is written that
    decompress would refuse (CsrError naming the layer instead). `predictor`: the model's
    csrtool.predictor.TokenPredictor, for dictionaries trained with it."""
    ids = _token_ids(dicts, predictor, header)
    decoded = _decoded_store(dicts)
    for i in range(len(header.layers)):
        k, v = cache.keys[i], cache.values[i]
        cfg = header.config.for_layer(i)
        try:
            ck, cv = codec.encode_layer(
                k, v, dicts.get(i, "k"), dicts.get(i, "v"), cfg, header.key_space, header.cache_key_space, header.layer_rope(i),
                _offsets(dicts, predictor, header, i, ids, decoded), _cross_store(header, i, decoded),
            )
        except CsrError as exc:
            raise CsrError(f"cache layer {i}: {exc}") from None
        yield layer_bytes(header, i, ck, cv)


def layer_bytes(header: CsrHeader, i: int, ck: codec.SectionCodes, cv: codec.SectionCodes) -> tuple[bytes, bytes]:
    """Layer i's (key bytes, value bytes), parsed back before they are handed out: nothing is
    written that decompress would refuse (CsrError naming the layer instead)."""
    try:
        c = header.config.for_layer(i)
        fk, fv = header.section_coefs(i)
        kb, vb = section_bytes(ck, header.n_atoms, c.sparsity_k, fk, c.set_indices), section_bytes(cv, header.n_atoms, c.sparsity_v, fv, c.set_indices)
        _parse_layer(header, i, kb, vb)
    except CsrError as exc:
        raise CsrError(f"cache layer {i}: {exc}") from None
    return kb, vb


def _parse_layer(hd: CsrHeader, i: int, kb: bytes, vb: bytes) -> tuple[codec.SectionCodes, codec.SectionCodes]:
    sk, sv = hd.shapes(i)
    c = hd.config.for_layer(i)
    fk, fv = hd.section_coefs(i)
    return (
        parse_section(kb, sk, hd.n_atoms, 1, c.sparsity_k, fk, c.window, hd.torch_dtype, c.sink, c.adaptive, c.set_indices),
        parse_section(vb, sv, hd.n_atoms, hd.value_split, c.sparsity_v, fv, c.window, hd.torch_dtype, c.sink, c.adaptive, c.set_indices),
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

    def __init__(self, path: Path, header: CsrHeader, head: bytes, size: int, digest: bytes) -> None:
        self.path, self.header, self.size = path, header, size
        self.header_end = len(head)
        self._head, self._digest = head, digest  # the verified preamble + header bytes and the file's SHA-256

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
        """(layer, key bytes, value bytes), read once and hashed as they are handed out.

        The file was verified by open_csr, but it may change before this second pass; so
        the bytes given out are hashed (after the header bytes open_csr parsed), and
        before the last layer is handed out the hash must equal the verified digest.
        A consumer keeps nothing until the iteration ends (read_csr and decompress)."""
        digest = hashlib.sha256(self._head)
        n = len(self.header.layers)
        with open(self.path, "rb") as fh:
            fh.seek(self.header_end)
            for i in range(n):
                nk, nv = self.header.section_sizes(i)
                kb, vb = fh.read(nk), fh.read(nv)
                if len(kb) != nk or len(vb) != nv:
                    raise CsrError(f"{self.path} changed while being read (truncated): read it again")
                digest.update(kb)
                digest.update(vb)
                if i == n - 1 and (digest.digest() != self._digest or fh.read(DIGEST + 1) != self._digest):
                    raise CsrError(f"{self.path} changed while being read (checksum mismatch): read it again")
                yield i, kb, vb

    def layers(self, dicts: DictSet, predictor=None) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(layer, keys, values) in the original dtype, one layer at a time (see `sections`); `predictor` as for encode_sections."""
        self.check_dicts(dicts)
        hd = self.header
        ids = _token_ids(dicts, predictor, hd)
        decoded = _decoded_store(dicts)
        for i, kb, vb in self.sections():
            try:
                ck, cv = _parse_layer(hd, i, kb, vb)
                k, v = codec.decode_layer(
                    ck, cv, dicts.get(i, "k"), dicts.get(i, "v"), hd.config.for_layer(i),
                    hd.key_space, hd.cache_key_space, hd.layer_rope(i), hd.torch_dtype,
                    _offsets(dicts, predictor, hd, i, ids, decoded), _cross_store(hd, i, decoded),
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
        if size < PREAMBLE.size + DIGEST or len(pre) < PREAMBLE.size:
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
        header, problem = _parse_header(raw)
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
    if header is None:
        raise CsrError(f"{path} is corrupted (invalid header: {problem}): compress the cache again")
    if header.version != version:
        raise CsrError(f"{path} is corrupted (invalid header: version {header.version} but the preamble says {version}): compress the cache again")
    if size != expected:
        raise CsrError(f"{path} is corrupted (size {size} bytes, the header implies {expected}): compress the cache again")
    return CsrReader(path, header, pre + raw, size, stored)


def _parse_header(raw: bytes) -> tuple[CsrHeader | None, str]:
    """(header, "") or (None, why): the checksum is checked first, so the reason is reported only after it."""
    try:
        return parse_header(raw), ""
    except CsrError as exc:
        return None, str(exc)


def read_csr(path: Path, dicts: DictSet, predictor=None) -> KVCache:
    """Decode a whole .csr file into a KVCache (meta from the header); `predictor` as for encode_sections."""
    reader = open_csr(path)
    keys, values = [], []
    for _, k, v in reader.layers(dicts, predictor):
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
    d_v, c_v, coef = header.layers[0][4], header.value_split, header.config.coef
    k_bits = sum(codec.side_bits(header.n_atoms, "k", c.sparsity_k, d_k, c_v, coef) for c in cfgs) / n / d_k
    v_bits = sum(codec.side_bits(header.n_atoms, "v", c.sparsity_v, d_v, c_v, coef) for c in cfgs) / n / d_v
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
    "CsrHeader", "CsrReader", "MAGIC", "VERSION", "check_fit", "make_header", "encode_sections", "write_csr", "open_csr",
    "read_csr", "scratch_layers", "size_report",
]
