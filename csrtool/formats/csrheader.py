"""The `.csr` header (docs/format.md §2): the dataclass, its canonical JSON and its validation.

    CsrHeader                                    frozen; encode() -> preamble + canonical JSON
    parse_header(raw bytes) -> CsrHeader         strict RFC 8259 JSON (no NaN, Infinity, 1e999999),
                                                 every field range-checked; CsrError naming the field
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import torch

from csrtool import codec
from csrtool.engine import packing
from csrtool.errors import CsrError
from csrtool.formats import csrsection
from csrtool.keyspace import RopeParams

MAGIC = b"\x89CSR\r\n\x1a\n"
VERSION = 6  # the newest; every version is still read and written (see CsrHeader.version)
CLASSIC_COEF = ("fp16", "fp8", "int8")  # one format for both sides: what versions 1-4 allow
FORMAT = "csrtool-csr"
PREAMBLE = struct.Struct("<8sHHI")  # magic, version, flags, header_len
DIGEST = 32
MAX_HEADER = 16 << 20
MAX_DIM = 1 << 31  # any one of B, H, T, D, window, sink
MAX_SPARSITY = 1 << 16
MAX_SPLIT = 1 << 16


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
    rope: RopeParams | None = None
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
        n, w, dt, s = self.n_atoms, cfg.window, self.torch_dtype, cfg.sink
        fk, fv = self.section_coefs(layer)
        return (
            csrsection.section_nbytes(sk, n, 1, cfg.sparsity_k, fk, w, dt, s, cfg.adaptive, cfg.set_indices),
            csrsection.section_nbytes(sv, n, self.value_split, cfg.sparsity_v, fv, w, dt, s, cfg.adaptive, cfg.set_indices),
        )

    def section_coefs(self, layer: int) -> tuple[str, str]:
        """The coefficient formats of layer `layer`'s key and value sections (codec.section_format)."""
        cfg, (_, _, _, dk, dv) = self.config.for_layer(layer), self.layers[layer]
        return cfg.section_coef("k", dk), cfg.section_coef("v", dv // self.value_split)

    def layer_rope(self, layer: int) -> RopeParams | None:
        """Layer `layer`'s own rotation (RopeParams.for_layer), or None when the file has none."""
        return None if self.rope is None else self.rope.for_layer(layer)

    @property
    def version(self) -> int:
        """1 for one sparsity for all layers, 2 with per-layer sparsities, 3 with per-layer rotations
        (rope.layers; the sparsities as in 1 or 2), 4 with adaptive codes (per-vector atom counts,
        §3.3; sparsities and rotations as in 1-3), 5 with a coefficient format per side or int4/int3
        coefficients (§3.2; codes adaptive or not, the rest as in 1-4), 6 with adaptive codes whose indices
        are set-coded (§3.4; any coefficient spec, the rest as in 1-5) (docs/format.md §2, §6)."""
        if self.config.adaptive and self.config.set_indices:
            return 6
        if self.config.coef not in CLASSIC_COEF:
            return 5
        if self.config.adaptive:
            return 4
        if self.rope is not None and self.rope.layers:
            return 3
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
            "rope": None if self.rope is None else self.rope.to_json(),
            "meta": self.meta,
        }
        if self.config.layer_sparsity is not None:
            obj["codec"]["layer_sparsity"] = [list(p) for p in self.config.layer_sparsity]
        if self.config.adaptive or self.version >= 5:
            obj["codec"]["adaptive"] = self.config.adaptive
        return obj

    def encode(self) -> bytes:
        """Preamble and canonical JSON header (docs/format.md §1-2)."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        body = text.encode("ascii")
        return PREAMBLE.pack(MAGIC, self.version, 0, len(body)) + body

    @property
    def file_nbytes(self) -> int:
        return len(self.encode()) + self.payload_nbytes + DIGEST


# ---------------------------------------------------------------- strict JSON


def _no_constant(name: str) -> float:
    raise CsrError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    val = float(text)
    if not math.isfinite(val):
        raise CsrError(f"number {text[:20]} is out of range (RFC 8259 numbers must be finite)")
    return val


def loads_strict(raw: bytes) -> object:
    """RFC 8259 JSON from ASCII bytes: NaN, Infinity and numbers that overflow a double are refused."""
    try:
        text = raw.decode("ascii")
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise CsrError("the header is not ASCII text") from None
    except RecursionError:
        raise CsrError("the header nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and ints longer than Python's digit limit
        raise CsrError(f"the header is not valid JSON ({str(exc).splitlines()[0][:80]})") from None


# ---------------------------------------------------------------- validation


def _obj(obj: dict, key: str, where: str = "") -> dict:
    val = obj.get(key)
    if not isinstance(val, dict):
        raise CsrError(f"{where}{key} must be an object, got {_show(val)}")
    return val


def _int(obj: dict, key: str, lo: int, hi: int = MAX_DIM, where: str = "") -> int:
    return _int_value(obj.get(key), f"{where}{key}", lo, hi)


def _int_value(val: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
        raise CsrError(f"{what} must be an integer in [{lo}, {hi}], got {_show(val)}")
    return val


def _choice(obj: dict, key: str, options, where: str = "") -> str:
    val = obj.get(key)
    if not isinstance(val, str) or val not in tuple(options):
        raise CsrError(f"{where}{key} must be one of {', '.join(options)}, got {_show(val)}")
    return val


def _show(val: object) -> str:
    text = repr(val)
    return text if len(text) <= 40 else text[:37] + "..."


def header_from_json(obj: object) -> CsrHeader:
    """Validate a parsed header; CsrError naming the first bad field and why."""
    if not isinstance(obj, dict):
        raise CsrError(f"the header must be a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise CsrError(f"format must be {FORMAT!r}, got {_show(obj.get('format'))}")
    version = _int(obj, "version", 1, VERSION)
    cd, dd = _obj(obj, "codec"), _obj(obj, "dicts")
    n_atoms = _int(cd, "n_atoms", 2, 1 << 24, "codec.")
    if _int(cd, "index_bits", 1, 24, "codec.") != packing.index_bits(n_atoms):
        raise CsrError(f"codec.index_bits must be {packing.index_bits(n_atoms)} for {n_atoms} atoms, got {_show(cd.get('index_bits'))}")
    value_split = _int(cd, "value_split", 1, MAX_SPLIT, "codec.")
    rows = obj.get("layers")
    if not isinstance(rows, list) or not rows:
        raise CsrError(f"layers must be a non-empty list of [B, H, T, Dk, Dv], got {_show(rows)}")
    layers = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 5:
            raise CsrError(f"layers[{i}] must be [B, H, T, Dk, Dv], got {_show(row)}")
        vals = tuple(_int_value(x, f"layers[{i}][{j}]", 1, MAX_DIM) for j, x in enumerate(row))
        if vals[4] % value_split:
            raise CsrError(f"layers[{i}]: value head_dim {vals[4]} is not divisible by codec.value_split {value_split}")
        layers.append(vals)
    cfg = _codec_config(cd, version, len(layers))
    key_space = _choice(cd, "key_space", codec.KEY_SPACES, "codec.")
    cache_key_space = _choice(cd, "cache_key_space", codec.KEY_SPACES, "codec.")
    rope_p = None if obj.get("rope") is None else RopeParams.from_json(obj["rope"])
    if rope_p is not None:
        if version < 4 and (version == 3) != bool(rope_p.layers):
            raise CsrError("rope.layers (per-layer rotations) is required in a version 3 header" if version == 3 else
                           "rope.layers (per-layer rotations) is only allowed in a version 3 or 4 header")
        rope_p.check_layers(len(layers))
    elif version == 3:
        raise CsrError("rope must hold per-layer rotations (rope.layers) in a version 3 header, got null")
    if key_space != cache_key_space:
        if rope_p is None:
            raise CsrError("rope is missing: the key codes and the cache use different key spaces")
        for i, (_, _, _, dk, _) in enumerate(layers):
            if 2 * len(rope_p.inv_freq) != dk:
                raise CsrError(f"rope.inv_freq has {len(rope_p.inv_freq)} entries but layers[{i}] has key head_dim {dk} (needs {dk // 2})")
    groups = _int(dd, "n_groups", 1, MAX_DIM, "dicts.")
    for i, (_, h, _, _, _) in enumerate(layers):
        if groups not in (1, h):
            raise CsrError(f"dicts.n_groups {groups} must be 1 or the {h} KV heads of layers[{i}]")
    model, meta, fp = obj.get("model"), obj.get("meta", {}), dd.get("fingerprint")
    if not (model is None or isinstance(model, str)):
        raise CsrError(f"model must be a string or null, got {_show(model)}")
    if not isinstance(meta, dict):
        raise CsrError(f"meta must be an object, got {_show(meta)}")
    if not isinstance(fp, str) or len(fp) != 64 or any(ch not in "0123456789abcdef" for ch in fp):
        raise CsrError(f"dicts.fingerprint must be 64 lowercase hex digits, got {_show(fp)}")
    return CsrHeader(
        dtype=_choice(obj, "dtype", codec.DTYPES),
        layers=tuple(layers),
        n_atoms=n_atoms,
        config=cfg,
        value_split=value_split,
        key_space=key_space,
        cache_key_space=cache_key_space,
        dict_fingerprint=fp,
        dict_scope=_choice(dd, "scope", ("head", "layer"), "dicts."),
        dict_groups=groups,
        model=model,
        rope=rope_p,
        meta=meta,
    )


def _codec_config(cd: dict, version: int, n_layers: int) -> codec.CodecConfig:
    per_layer = None
    if version == 2 or (version >= 3 and "layer_sparsity" in cd):
        rows = cd.get("layer_sparsity")
        if not isinstance(rows, list) or len(rows) != n_layers:
            raise CsrError(f"codec.layer_sparsity must list one [S_k, S_v] per layer ({n_layers}), got {_show(rows)}")
        pairs = []
        for i, r in enumerate(rows):
            if not isinstance(r, list) or len(r) != 2:
                raise CsrError(f"codec.layer_sparsity[{i}] must be [S_k, S_v], got {_show(r)}")
            pairs.append(tuple(_int_value(v, f"codec.layer_sparsity[{i}]", 1, MAX_SPARSITY) for v in r))
        per_layer = tuple(pairs)
    elif "layer_sparsity" in cd:
        raise CsrError("codec.layer_sparsity is only allowed in a version 2 to 6 header")
    if version == 4 and cd.get("adaptive") is not True:
        raise CsrError(f"codec.adaptive must be true in a version 4 header, got {_show(cd.get('adaptive'))}")
    if version == 5 and not isinstance(cd.get("adaptive"), bool):
        raise CsrError(f"codec.adaptive must be true or false in a version 5 header, got {_show(cd.get('adaptive'))}")
    if version == 6 and cd.get("adaptive") is not True:
        raise CsrError(f"codec.adaptive must be true in a version 6 header, got {_show(cd.get('adaptive'))}")
    if version < 4 and "adaptive" in cd:
        raise CsrError("codec.adaptive is only allowed in a version 4 to 6 header")
    adaptive = version in (4, 6) or (version == 5 and cd["adaptive"])
    return codec.CodecConfig(
        sparsity_k=_int(cd, "sparsity_k", 1, MAX_SPARSITY, "codec."),
        sparsity_v=_int(cd, "sparsity_v", 1, MAX_SPARSITY, "codec."),
        coef=_coef(cd, version),
        method=_choice(cd, "method", codec.METHODS, "codec."),
        window=_int(cd, "window", 0, MAX_DIM, "codec."),
        sink=_int(cd, "sink", 0, MAX_DIM, "codec."),
        layer_sparsity=per_layer,
        adaptive=adaptive,
        set_indices=version == 6 or not adaptive,  # meaningful for adaptive codes only; otherwise the default
    )


def _coef(cd: dict, version: int) -> str:
    """codec.coef: one of CLASSIC_COEF before version 5; in version 5 a spec that needs it (a format per
    side, or int4/int3); in version 6 any spec."""
    coef = cd.get("coef")
    if version < 5:
        return _choice(cd, "coef", CLASSIC_COEF, "codec.")
    try:
        codec.coef_sides(coef)
    except CsrError:
        raise CsrError(f"codec.coef must be a coefficient format, or keys/values (e.g. fp8/int3), got {_show(coef)}") from None
    if coef in CLASSIC_COEF and version == 5:
        raise CsrError(f"codec.coef {coef} belongs in a version 1-4 header, not version 5")
    return coef


def parse_header(raw: bytes) -> CsrHeader:
    """A header from its JSON bytes; CsrError naming the bad field (never another exception)."""
    return header_from_json(loads_strict(raw))
