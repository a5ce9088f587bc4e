"""The CSR codec: sparse-code one layer's keys or values, quantise, pack to bytes.

No file I/O here: `csrfile` frames the bytes this module makes (docs/format.md §3).

    CodecConfig(sparsity_k, sparsity_v, coef, method, window, sink) frozen, validated
    spans(T, window, sink) -> (s, Tc, w)                            sink / coded / tail tokens
    bits_per_channel(N, D, s_k, s_v, C, coef) -> code bits/channel (K and V averaged)
    choose_sparsity(bits, N, D, C, coef) -> (s_k, s_v)              fits a bit budget
    roundtrip(x [B, H, T, D], atoms [G, C, N, Dc], S, coef, method) -> x_hat [B, H, T, D]
    roundtrip_keys(k, atoms, S, coef, method, positions, rope, key_space, cache_key_space)
    section_bytes(x_code, x_tail, atoms, S, coef, method) -> bytes   one K or V section
    parse_section(buf, shape, N, C, S, coef, window, dtype, sink) -> idx, coef, verbatim
    decode_codes(idx, coef, atoms) -> x_hat (code space, float32)

`roundtrip` applies exactly the quantisation of the file, so evaluation code can
measure what compress -> decompress gives without touching disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csrtool.engine import packing, pursuit, rope
from csrtool.errors import CsrError

COEF_FORMATS = packing.COEF_FORMATS
METHODS = pursuit.METHODS
KEY_SPACES = ("post-rope", "pre-rope")  # where keys are coded: as the cache stores them, or before RoPE
DEFAULT_WINDOW = 4  # last tokens kept verbatim: small, so short caches stay well compressed (docs/quality.md, "Numbers behind defaults")
DEFAULT_SINK = 4  # first tokens kept uncompressed: they draw a large share of attention (attention sinks; docs/quality.md §1)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class CodecConfig:
    sparsity_k: int
    sparsity_v: int
    coef: str = "fp8"
    method: str = "omp"
    window: int = DEFAULT_WINDOW
    sink: int = DEFAULT_SINK
    layer_sparsity: tuple[tuple[int, int], ...] | None = None  # per layer (s_k, s_v), overriding the two above

    def __post_init__(self) -> None:
        for name in ("sparsity_k", "sparsity_v"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise CsrError(f"{name} must be an integer >= 1, got {val!r}")
        if self.coef not in COEF_FORMATS:
            raise CsrError(f"coefficient format must be one of {', '.join(COEF_FORMATS)}, got {self.coef!r}")
        if self.method not in METHODS:
            raise CsrError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise CsrError(f"window must be an integer >= 0 (tokens kept uncompressed), got {self.window!r}")
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise CsrError(f"sink must be an integer >= 0 (first tokens kept uncompressed), got {self.sink!r}")
        if self.layer_sparsity is not None:
            for i, pair in enumerate(self.layer_sparsity):
                ok = isinstance(pair, tuple) and len(pair) == 2
                if not ok or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in pair):
                    raise CsrError(f"layer_sparsity[{i}] must be a pair of integers >= 1, got {pair!r}")

    def for_layer(self, layer: int) -> "CodecConfig":
        """The uniform config of one layer (its own sparsities when layer_sparsity is set)."""
        if self.layer_sparsity is None:
            return self
        s_k, s_v = self.layer_sparsity[layer]
        return CodecConfig(s_k, s_v, self.coef, self.method, self.window, self.sink)


def spans(t: int, window: int, sink: int) -> tuple[int, int, int]:
    """Split T tokens into (s sink tokens, Tc coded tokens, w tail tokens): w = min(W, T), s = min(sink, T - w)."""
    w = min(window, t)
    s = min(sink, t - w)
    return s, t - w - s, w


# ---------------------------------------------------------------- accounting


def vector_bits(n_atoms: int, sparsity: int, chunks: int, coef: str) -> int:
    """Bits of one coded vector: C*S*(index + coefficient) + vector scale."""
    return chunks * sparsity * (packing.index_bits(n_atoms) + packing.COEF_BITS[coef]) + packing.VECTOR_SCALE_BITS[coef]


def bits_per_channel(n_atoms: int, head_dim: int, sparsity_k: int, sparsity_v: int, value_split: int, coef: str) -> float:
    """Code bits per channel, keys and values averaged (group scales, padding and tail excluded)."""
    k = vector_bits(n_atoms, sparsity_k, 1, coef)
    v = vector_bits(n_atoms, sparsity_v, value_split, coef)
    return (k + v) / (2 * head_dim)


def choose_sparsity(bits: float, n_atoms: int, head_dim: int, value_split: int, coef: str) -> tuple[int, int]:
    """Largest (s_k, s_v) whose average code bits per channel fit `bits`.

    Among the pairs that use the most of the budget, prefer the one whose key cost
    is closest to twice the value cost, then the one with more key atoms: key errors
    pass through the softmax and dominate perplexity (measured splits: docs/quality.md §2).
    """
    if coef not in COEF_FORMATS:
        raise CsrError(f"coefficient format must be one of {', '.join(COEF_FORMATS)}, got {coef!r}")
    if not (bits > 0 and math.isfinite(bits)):
        raise CsrError(f"--bits must be a positive number, got {bits}")
    budget = bits * 2 * head_dim
    kmax = max(1, min(n_atoms, head_dim))
    best = None
    for s_k in range(1, kmax + 1):
        ck = vector_bits(n_atoms, s_k, 1, coef)
        for s_v in range(1, max(1, min(n_atoms, head_dim // value_split)) + 1):
            cv = vector_bits(n_atoms, s_v, value_split, coef)
            if ck + cv > budget + 1e-9:
                break
            key = (ck + cv, -abs(ck - 2 * cv), s_k)
            if best is None or key > best[0]:
                best = (key, s_k, s_v)
    if best is None:
        least = bits_per_channel(n_atoms, head_dim, 1, 1, value_split, coef)
        raise CsrError(
            f"--bits {bits} is below the smallest code ({least:.4f} bits per channel with one atom for K and V "
            f"at {n_atoms} atoms, {coef}): raise --bits or use --sparsity"
        )
    return best[1], best[2]


def section_nbytes(
    shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int, dtype: torch.dtype, sink: int = 0
) -> int:
    """Bytes of one section (docs/format.md §3) for a tensor of shape [B, H, T, D]."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m = b * h * tc
    n = m * chunks * sparsity
    coef_bytes = n * packing.COEF_BITS[coef] // 8
    vscale = 2 * m if coef == "int8" else 0
    elem = torch.empty((), dtype=dtype).element_size()
    return 4 * b * h + vscale + packing.packed_nbytes(n, packing.index_bits(n_atoms)) + coef_bytes + b * h * (s + w) * d * elem


# ---------------------------------------------------------------- coding


def _encode_groups(x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [G, M, D], atoms [G, N, D] -> idx, coef [G, M, S]."""
    return pursuit.encode_groups(x, atoms, sparsity, method)


def _decode_groups(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    return pursuit.decode_groups(idx, coef, atoms)


def _check_atoms(x_shape: tuple[int, ...], atoms: torch.Tensor, what: str = "cache") -> None:
    b, h, t, d = x_shape
    g, c, n, dc = atoms.shape
    if c * dc != d:
        raise CsrError(f"dictionary/cache shape mismatch: the {what} has head_dim {d} but the dictionary covers {c} x {dc} = {c * dc} channels: use a dictionary trained for this model")
    if g not in (1, h):
        raise CsrError(f"dictionary/cache shape mismatch: the dictionary has {g} head groups but the {what} has {h} KV heads: use a dictionary trained for this model")


def encode_codes(x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> idx, coef [B, H, T, C, S] (float32 coefficients, not quantised)."""
    _check_atoms(tuple(x.shape), atoms)
    b, h, t, d = x.shape
    g, c, n, dc = atoms.shape
    xf = x.to(torch.float32).reshape(b, h, t, c, dc)
    if g == h:
        xg = xf.permute(1, 3, 0, 2, 4).reshape(h * c, b * t, dc)  # [H*C, B*T, Dc]
    else:
        xg = xf.permute(3, 0, 1, 2, 4).reshape(c, b * h * t, dc)  # [C, B*H*T, Dc]
    idx, coef = _encode_groups(xg, atoms.reshape(g * c, n, dc).to(torch.float32), sparsity, method)
    s = sparsity
    if g == h:
        idx, coef = (z.reshape(h, c, b, t, s).permute(2, 0, 3, 1, 4) for z in (idx, coef))
    else:
        idx, coef = (z.reshape(c, b, h, t, s).permute(1, 2, 3, 0, 4) for z in (idx, coef))
    return idx.contiguous(), coef.contiguous()


def decode_codes(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """idx, coef [B, H, T, C, S] -> float32 [B, H, T, C*Dc]."""
    b, h, t, c, s = idx.shape
    g, _, n, dc = atoms.shape
    if g == h:
        perm, shape = (1, 3, 0, 2, 4), (h * c, b * t, s)
    else:
        perm, shape = (3, 0, 1, 2, 4), (c, b * h * t, s)
    ig, cg = (z.permute(*perm).reshape(shape) for z in (idx, coef))
    out = _decode_groups(ig, cg, atoms.reshape(g * c, n, dc).to(torch.float32))  # [G*C, rows, Dc]
    if g == h:
        out = out.reshape(h, c, b, t, dc).permute(2, 0, 3, 1, 4)
    else:
        out = out.reshape(c, b, h, t, dc).permute(1, 2, 3, 0, 4)
    return out.reshape(b, h, t, c * dc)


def quantize_codes(coef: torch.Tensor, fmt: str):
    """coef [B, H, T, C, S] -> (q [B*H, T, C*S], g [B*H], v [B*H, T] | None)."""
    b, h, t, c, s = coef.shape
    return packing.quantize(coef.reshape(b * h, t, c * s), fmt)


def dequantize_codes(q, g, v, fmt: str, shape: tuple[int, ...]) -> torch.Tensor:
    return packing.dequantize(q, g, v, fmt).reshape(shape)


def shift(x: torch.Tensor, mean: torch.Tensor | None, sign: float) -> torch.Tensor:
    """x [B, H, T, D] (float32) plus sign * the dictionary's mean [G, D] (G = H or 1); x itself without one."""
    if mean is None:
        return x
    m = mean.to(x.device, torch.float32)
    return x + sign * m[None, :, None, :]


def roundtrip(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, coef: str = "fp8", method: str = "omp", mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """What compress -> decompress gives for x [B, H, T, D] coded in place: x_hat in x's dtype.

    Coefficient scales are per (batch, head) over the T tokens given, as in a file
    section, so pass the coded tokens only (without the window) to match a file.
    `mean` [G, D] (the dictionary's, if it has one) is subtracted before coding."""
    idx, c = encode_codes(shift(x.to(torch.float32), mean, -1.0), atoms, sparsity, method)
    q, g, v = quantize_codes(c, coef)
    c_hat = dequantize_codes(q, g, v, coef, tuple(c.shape))
    return shift(decode_codes(idx, c_hat, atoms), mean, 1.0).to(x.dtype)


# ---------------------------------------------------------------- key space


def rope_params(meta: dict, n_tokens: int) -> dict:
    """{'inv_freq', 'scaling', 'position_offset'} from a cache's meta, or CsrError."""
    info = meta.get("rope") if isinstance(meta, dict) else None
    if not isinstance(info, dict) or not isinstance(info.get("inv_freq"), list):
        raise CsrError(
            "the dictionary codes keys before RoPE but the cache carries no RoPE parameters (meta.rope): "
            "save the cache with csrtool cache, or use a dictionary trained on post-RoPE keys"
        )
    offset = meta.get("position_offset", 0) or 0
    return {"inv_freq": [float(f) for f in info["inv_freq"]], "scaling": float(info.get("scaling", 1.0)), "position_offset": int(offset)}


def _positions(rope_p: dict, t: int, device: torch.device) -> torch.Tensor:
    return torch.arange(t, device=device, dtype=torch.float32) + rope_p["position_offset"]


def to_code_space(k: torch.Tensor, key_space: str, cache_key_space: str, rope_p: dict | None) -> torch.Tensor:
    """Keys [B, H, T, D] from the cache's key space to the dictionary's (float32)."""
    kf = k.to(torch.float32)
    if key_space == cache_key_space:
        return kf
    assert rope_p is not None
    inv = torch.tensor(rope_p["inv_freq"], dtype=torch.float32, device=k.device)
    if inv.numel() * 2 != k.shape[-1]:
        raise CsrError(f"RoPE parameters cover {inv.numel() * 2} channels but keys have {k.shape[-1]}: the cache meta is inconsistent")
    pos = _positions(rope_p, k.shape[2], k.device)
    fn = rope.unrotate if key_space == "pre-rope" else rope.rotate
    return fn(kf, pos, inv, rope_p["scaling"])


def from_code_space(k: torch.Tensor, key_space: str, cache_key_space: str, rope_p: dict | None) -> torch.Tensor:
    """Inverse of to_code_space (float32)."""
    if key_space == cache_key_space:
        return k
    assert rope_p is not None
    inv = torch.tensor(rope_p["inv_freq"], dtype=torch.float32, device=k.device)
    pos = _positions(rope_p, k.shape[2], k.device)
    fn = rope.rotate if key_space == "pre-rope" else rope.unrotate
    return fn(k.to(torch.float32), pos, inv, rope_p["scaling"])


def roundtrip_keys(
    k: torch.Tensor,
    atoms: torch.Tensor,
    sparsity: int,
    coef: str = "fp8",
    method: str = "omp",
    positions_offset: int = 0,
    rope_info: dict | None = None,
    key_space: str = "pre-rope",
    cache_key_space: str = "post-rope",
    mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keys k [B, H, T, D] as stored in a cache -> what decompress returns for them.

    `rope_info` = {'inv_freq': [...], 'scaling': s} (the cache meta's `rope`); keys
    sit at positions positions_offset + 0..T-1. Needed only when key spaces differ.
    """
    rope_p = None
    if key_space != cache_key_space:
        rope_p = rope_params({"rope": rope_info, "position_offset": positions_offset}, k.shape[2])
    kc = to_code_space(k, key_space, cache_key_space, rope_p)
    return from_code_space(roundtrip(kc, atoms, sparsity, coef, method, mean), key_space, cache_key_space, rope_p).to(k.dtype)


# ---------------------------------------------------------------- bytes


def section_bytes(
    x_code: torch.Tensor, x_tail: torch.Tensor, atoms: torch.Tensor, sparsity: int, coef: str, method: str, mean: torch.Tensor | None = None,
) -> bytes:
    """Section bytes from the coded tokens x_code [B, H, Tc, D] (code space, float; `mean` subtracted
    here) and the verbatim tokens x_tail [B, H, s + w, D] (sink then tail, original dtype)."""
    g_dicts, c, n, dc = atoms.shape
    b, h, tc, d = x_code.shape
    bits = packing.index_bits(n)
    parts: list[bytes] = []
    if tc:
        idx, cf = encode_codes(shift(x_code.to(torch.float32), mean, -1.0), atoms, sparsity, method)
        q, g, v = quantize_codes(cf, coef)
    else:
        idx = torch.zeros(0, dtype=torch.int64)
        q, g, v = packing.quantize(torch.zeros(b * h, 0, c * sparsity), coef)
    parts.append(g.to(torch.float32).cpu().numpy().tobytes())
    if coef == "int8":
        parts.append(v.cpu().numpy().tobytes())
    parts.append(packing.pack_indices(idx.reshape(-1).cpu(), bits).numpy().tobytes())
    parts.append(packing.to_bytes_view(q.cpu()).numpy().tobytes())
    parts.append(x_tail.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return b"".join(parts)


def parse_section(
    buf: bytes, shape: tuple[int, ...], n_atoms: int, chunks: int, sparsity: int, coef: str, window: int, dtype: torch.dtype,
    sink: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Section bytes -> (idx [B, H, Tc, C, S], coef float32 [B, H, Tc, C, S], verbatim [B, H, s + w, D]).

    The verbatim tokens are the s sink tokens then the w tail tokens.
    Raises CsrError on values a valid writer never produces (index >= N, NaN...)."""
    b, h, t, d = shape
    s, tc, w = spans(t, window, sink)
    m = b * h * tc
    n = m * chunks * sparsity
    raw = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.zeros(0, dtype=torch.uint8)
    pos = 0

    def take(nbytes: int) -> torch.Tensor:
        nonlocal pos
        out = raw[pos : pos + nbytes]
        pos += nbytes
        return out

    g = packing.from_bytes_view(take(4 * b * h), torch.float32, (b * h,))
    v = packing.from_bytes_view(take(2 * m), torch.float16, (b * h, tc)) if coef == "int8" else None
    bits = packing.index_bits(n_atoms)
    idx, pad_ok = packing.unpack_indices(take(packing.packed_nbytes(n, bits)), n, bits)
    q = packing.from_bytes_view(take(n * packing.COEF_BITS[coef] // 8), coef, (b * h, tc, chunks * sparsity))
    tail = packing.from_bytes_view(take(b * h * (s + w) * d * torch.empty((), dtype=dtype).element_size()), dtype, (b, h, s + w, d))
    assert pos == len(buf), (pos, len(buf))
    if not pad_ok or (n and int(idx.max()) >= n_atoms):
        raise CsrError("corrupted codes (atom index out of range)")
    if coef == "int8" and bool((q == -128).any()):
        raise CsrError("corrupted codes (int8 coefficient -128)")
    cf = packing.dequantize(q, g, v, coef)
    if not (torch.isfinite(g).all() and torch.isfinite(cf).all()):
        raise CsrError("corrupted codes (non-finite coefficient or scale)")
    return idx.reshape(b, h, tc, chunks, sparsity), cf.reshape(b, h, tc, chunks, sparsity), tail


# ---------------------------------------------------------------- one layer


def encode_layer(
    k: torch.Tensor,
    v: torch.Tensor,
    atoms_k: torch.Tensor,
    atoms_v: torch.Tensor,
    cfg: CodecConfig,
    key_space: str,
    cache_key_space: str,
    rope_p: dict | None,
    means: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[bytes, bytes]:
    """Key and value section bytes of one layer: k, v [B, H, T, D] as in the cache; `means` the dictionaries' (K, V)."""
    _check_atoms(tuple(k.shape), atoms_k, "cache's keys")
    _check_atoms(tuple(v.shape), atoms_v, "cache's values")
    if atoms_k.shape[1] != 1:
        raise CsrError(f"key dictionaries must have 1 channel chunk, got {atoms_k.shape[1]}: use a dictionary from csrtool train-dict")
    s, tc, _ = spans(k.shape[2], cfg.window, cfg.sink)
    kc = to_code_space(k[:, :, s : s + tc], key_space, cache_key_space, _shifted(rope_p, s))
    kb = section_bytes(kc, _verbatim(k, s, tc), atoms_k, cfg.sparsity_k, cfg.coef, cfg.method, means[0])
    vb = section_bytes(v[:, :, s : s + tc].to(torch.float32), _verbatim(v, s, tc), atoms_v, cfg.sparsity_v, cfg.coef, cfg.method, means[1])
    return kb, vb


def _verbatim(x: torch.Tensor, s: int, tc: int) -> torch.Tensor:
    """The tokens a section stores as they are: the s sink tokens, then the tail after the coded ones."""
    return torch.cat([x[:, :, :s], x[:, :, s + tc :]], dim=2)


def _shifted(rope_p: dict | None, s: int) -> dict | None:
    """RoPE parameters for the coded tokens, which start at token s of the cache."""
    return None if rope_p is None else {**rope_p, "position_offset": rope_p["position_offset"] + s}


def decode_section(
    buf: bytes, shape: tuple[int, ...], atoms: torch.Tensor, sparsity: int, coef: str, window: int, dtype: torch.dtype,
    sink: int = 0, mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Section bytes -> (coded tokens float32 [B, H, Tc, D] in code space, verbatim [B, H, s + w, D])."""
    g, c, n, dc = atoms.shape
    idx, cf, tail = parse_section(buf, shape, n, c, sparsity, coef, window, dtype, sink)
    return shift(decode_codes(idx, cf, atoms), mean, 1.0), tail


def decode_layer(
    kb: bytes,
    vb: bytes,
    shape_k: tuple[int, ...],
    shape_v: tuple[int, ...],
    atoms_k: torch.Tensor,
    atoms_v: torch.Tensor,
    cfg: CodecConfig,
    key_space: str,
    cache_key_space: str,
    rope_p: dict | None,
    dtype: torch.dtype,
    means: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of encode_layer: k, v [B, H, T, D] in `dtype`."""
    s, _, _ = spans(shape_k[2], cfg.window, cfg.sink)
    kc, kverb = decode_section(kb, shape_k, atoms_k, cfg.sparsity_k, cfg.coef, cfg.window, dtype, cfg.sink, means[0])
    vc, vverb = decode_section(vb, shape_v, atoms_v, cfg.sparsity_v, cfg.coef, cfg.window, dtype, cfg.sink, means[1])
    kc = from_code_space(kc, key_space, cache_key_space, _shifted(rope_p, s))
    k = torch.cat([kverb[:, :, :s], kc.to(dtype), kverb[:, :, s:]], dim=2)
    v = torch.cat([vverb[:, :, :s], vc.to(dtype), vverb[:, :, s:]], dim=2)
    return k, v
