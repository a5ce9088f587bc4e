"""The CSR codec: sparse-code one layer's keys or values, quantise, pack to bytes.

No bytes here: formats/csrsection.py turns SectionCodes into the bytes of docs/format.md §3.

    CodecConfig(sparsity_k, sparsity_v, coef, method, window, sink) frozen, validated; coef: one format or keys/values
                                                                    ("fp8/int4"), .section_coef(kind, Dc) a section's
    spans(T, window, sink) -> (s, Tc, w)                            sink / coded / tail tokens
    bits_per_channel(N, D, s_k, s_v, C, coef) -> code bits/channel (K and V averaged)
    choose_sparsity(bits, N, D, C, coef) -> (s_k, s_v)              fits a bit budget
    roundtrip(x [B, H, T, D], atoms [G, C, N, Dc], S, coef, method) -> x_hat [B, H, T, D]
    roundtrip_keys(k, atoms, S, coef, method, positions, rope, key_space, cache_key_space, mean, layer)
    RopeParams(inv_freq, scaling, position_offset, layers) frozen, validated; .from_meta(cache meta), .from_json(header)
    encode_layer(k, v, atoms_k, atoms_v, cfg, ...) -> (SectionCodes, SectionCodes)   tensors, not bytes; rope_p: the layer's
    decode_layer(codes_k, codes_v, atoms_k, atoms_v, cfg, ...) -> k, v [B, H, T, D]
    decode_codes(idx, coef, atoms) -> x_hat (code space, float32)

`roundtrip` applies exactly the quantisation of the file, so evaluation code can
measure what compress -> decompress gives without touching disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from csrtool.engine import packing, pursuit, setcode
from csrtool.errors import CsrError
from csrtool.budget import (  # noqa: F401 (re-exported: the accounting of codes lives in budget.py)
    coef_side,
    coef_sides,
    section_format,
    side_bits,
    vector_bits,
    bits_per_channel,
    max_sparsity,
    ADAPTIVE_LEAST,
    adaptive_for,
    adaptive_max,
    adaptive_slots,
    adaptive_bits,
    adaptive_cost,
    count_bits,
    check_sparsity,
    choose_sparsity,
)
from csrtool.keyspace import RopeParams, from_code_space, to_code_space  # noqa: F401 (re-exported)

COEF_FORMATS = packing.COEF_FORMATS
DEFAULT_COEF = "fp8/int4"  # keys fp8; values 4-bit integers with an fp8 scale per vector where a section has at most
                           # Dc/8 atoms per chunk, fp8 beyond (budget.section_format; docs/quality.md, tenth pass)
METHODS = pursuit.METHODS
KEY_SPACES = ("post-rope", "pre-rope")  # where keys are coded: as the cache stores them, or before RoPE
DEFAULT_WINDOW = 4  # last tokens kept verbatim: small, so short caches stay well compressed (docs/quality.md, "Numbers behind defaults")
DEFAULT_SINK = 4  # first tokens kept uncompressed: they draw a large share of attention (attention sinks; docs/quality.md §1)
FAST = True  # atoms picked from bf16 correlation GEMMs where the hardware has them (pursuit.fast_correlations); exact coefficients
ADAPTIVE_DEFAULT = True  # the CLI's codes (compress, eval): per-vector adaptive counts or S atoms for every vector
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
    adaptive: bool = False  # per-vector atom counts (0..adaptive_max(S)), mean within S's bits (engine/adaptive.py)
    set_indices: bool = True  # adaptive codes: each vector's indices as one sorted multiset (engine/setcode.py, format
                              # version 6); False: b-bit fields in fixed atom slots (versions 4-5, still read and written)

    def __post_init__(self) -> None:
        for name in ("sparsity_k", "sparsity_v"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise CsrError(f"{name} must be an integer >= 1, got {val!r}")
        k_fmt, v_fmt = coef_sides(self.coef)
        if k_fmt == v_fmt and self.coef != k_fmt:
            object.__setattr__(self, "coef", k_fmt)  # "fp8/fp8" is "fp8"
        if self.method not in METHODS:
            raise CsrError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise CsrError(f"window must be an integer >= 0 (tokens kept uncompressed), got {self.window!r}")
        if not isinstance(self.sink, int) or isinstance(self.sink, bool) or self.sink < 0:
            raise CsrError(f"sink must be an integer >= 0 (first tokens kept uncompressed), got {self.sink!r}")
        if not isinstance(self.adaptive, bool):
            raise CsrError(f"adaptive must be true or false, got {self.adaptive!r}")
        if not isinstance(self.set_indices, bool):
            raise CsrError(f"set_indices must be true or false, got {self.set_indices!r}")
        if self.layer_sparsity is not None:
            for i, pair in enumerate(self.layer_sparsity):
                ok = isinstance(pair, tuple) and len(pair) == 2
                if not ok or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in pair):
                    raise CsrError(f"layer_sparsity[{i}] must be a pair of integers >= 1, got {pair!r}")

    def section_coef(self, kind: str, dim: int) -> str:
        """The coefficient format of this config's key ("k") or value ("v") sections, chunks of `dim` channels
        (budget.section_format: the side's, or fp8 for a narrow side with too many atoms)."""
        return section_format(self.coef, kind, self.sparsity_k if kind == "k" else self.sparsity_v, dim)

    def for_layer(self, layer: int) -> "CodecConfig":
        """The uniform config of one layer (its own sparsities when layer_sparsity is set)."""
        if self.layer_sparsity is None:
            return self
        s_k, s_v = self.layer_sparsity[layer]
        return CodecConfig(s_k, s_v, self.coef, self.method, self.window, self.sink, adaptive=self.adaptive, set_indices=self.set_indices)


def spans(t: int, window: int, sink: int) -> tuple[int, int, int]:
    """Split T tokens into (s sink tokens, Tc coded tokens, w tail tokens): w = min(W, T), s = min(sink, T - w)."""
    w = min(window, t)
    s = min(sink, t - w)
    return s, t - w - s, w


# ---------------------------------------------------------------- coding


def _encode_groups(x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [G, M, D], atoms [G, N, D] -> idx, coef [G, M, S]."""
    return pursuit.encode_groups(x, atoms, sparsity, method, fast=FAST)


def _decode_groups(idx: torch.Tensor, coef: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    return pursuit.decode_groups(idx, coef, atoms)


def _check_atoms(x_shape: tuple[int, ...], atoms: torch.Tensor, what: str = "cache") -> None:
    b, h, t, d = x_shape
    g, c, n, dc = atoms.shape
    if c * dc != d:
        raise CsrError(f"dictionary/cache shape mismatch: the {what} has head_dim {d} but the dictionary covers {c} x {dc} = {c * dc} channels: use a dictionary trained for this model")
    if g not in (1, h):
        raise CsrError(f"dictionary/cache shape mismatch: the dictionary has {g} head groups but the {what} has {h} KV heads: use a dictionary trained for this model")


def encode_codes(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str, adaptive: bool = False, coef: str = "fp8", kind: str = "k",
    sets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> idx, coef [B, H, T, C, S] (float32 coefficients, not quantised).

    adaptive: per-vector counts (encode_counted, budget in `coef`'s bits, criterion by `kind`); S is
    then adaptive_max(S) and coefficients past a vector's count are zero."""
    idx, cf, _ = encode_counted(x, atoms, sparsity, method, adaptive, coef, kind, sets)
    return idx, cf


def encode_counted(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, method: str, adaptive: bool = True, coef: str = "fp8", kind: str = "k",
    sets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [B, H, T, D] -> idx, coef [B, H, T, C, S'] and counts [B, H, T, C] (atoms used per vector chunk).

    Fixed (adaptive False, or S < ADAPTIVE_LEAST): S' = S and counts None (every count is S). Adaptive: S' = adaptive_max(S); each chunk
    gets 0..S' atoms, at most adaptive_slots(...) over the whole call, so the codes with their counts
    cost no more bits than S fixed atoms; coefficients (and indices) past a count are zero. The counts
    minimise the summed squared error for keys (`kind` "k": a logit error is q·e, absolute) and the
    summed error relative to each vector's energy for values ("v": an attention output that rests on
    one token has that token's relative error; the absolute criterion starved such values, +9.3%
    against -0.0% on a licence text, docs/quality.md). `sets` (adaptive only): indices priced and ordered
    as set codes (each chunk's atoms in ascending index order, the budget in bits: adaptive_bits), else
    atom slots of fixed fields (adaptive_slots, pursuit order)."""
    _check_atoms(tuple(x.shape), atoms)
    b, h, t, d = x.shape
    g, c, n, dc = atoms.shape
    xf = x.to(torch.float32).reshape(b, h, t, c, dc)
    if g == h:
        xg = xf.permute(1, 3, 0, 2, 4).reshape(h * c, b * t, dc)  # [H*C, B*T, Dc]
    else:
        xg = xf.permute(3, 0, 1, 2, 4).reshape(c, b * h * t, dc)  # [C, B*H*T, Dc]
    ag = atoms.reshape(g * c, n, dc).to(torch.float32)
    if adaptive_for(adaptive, sparsity):
        s = adaptive_max(sparsity, dc, n)
        fmt = section_format(coef, kind, sparsity, dc)
        if sets:
            total = adaptive_bits(xg.shape[0] * xg.shape[1], sparsity, dc, n, fmt)
            idx, cf, counts = pursuit.encode_groups_adaptive(xg, ag, s, total, method, relative=kind == "v",
                                                             cost=adaptive_cost(sparsity, dc, n, fmt), fast=FAST)
            idx, cf = (z.reshape(idx.shape) for z in setcode.sort_codes(idx.reshape(-1, s), cf.reshape(-1, s), counts.reshape(-1)))
        else:
            total = adaptive_slots(xg.shape[0] * xg.shape[1], sparsity, dc, n, fmt)
            idx, cf, counts = pursuit.encode_groups_adaptive(xg, ag, s, total, method, relative=kind == "v", fast=FAST)
    else:
        s = sparsity
        idx, cf = _encode_groups(xg, ag, s, method)
        counts = None
    if g == h:
        idx, cf = (z.reshape(h, c, b, t, s).permute(2, 0, 3, 1, 4) for z in (idx, cf))
        counts = None if counts is None else counts.reshape(h, c, b, t).permute(2, 0, 3, 1).contiguous()
    else:
        idx, cf = (z.reshape(c, b, h, t, s).permute(1, 2, 3, 0, 4) for z in (idx, cf))
        counts = None if counts is None else counts.reshape(c, b, h, t).permute(1, 2, 3, 0).contiguous()
    return idx.contiguous(), cf.contiguous(), counts


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
    """x [B, H, T, D] (float32) plus sign * the dictionary's mean [G, D] (G = H or 1), or a per-token offset
    [B, H, T, D] (the mean plus the token predictor's part, csrtool.reconstruct); x itself without one."""
    if mean is None:
        return x
    m = mean.to(x.device, torch.float32)
    return x + sign * (m if m.dim() == 4 else m[None, :, None, :])


def roundtrip(
    x: torch.Tensor, atoms: torch.Tensor, sparsity: int, coef: str = "fp8", method: str = "omp", mean: torch.Tensor | None = None,
    adaptive: bool = False, kind: str = "k", sets: bool = True,
) -> torch.Tensor:
    """What compress -> decompress gives for x [B, H, T, D] coded in place: x_hat in x's dtype.

    Coefficient scales are per (batch, head) over the T tokens given, as in a file
    section, so pass the coded tokens only (without the window) to match a file.
    `mean` [G, D] (the dictionary's, if it has one) is subtracted before coding."""
    idx, c = encode_codes(shift(x.to(torch.float32), mean, -1.0), atoms, sparsity, method, adaptive, coef, kind, sets)
    fmt = section_format(coef, kind, sparsity, atoms.shape[-1])
    q, g, v = quantize_codes(c, fmt)
    c_hat = dequantize_codes(q, g, v, fmt, tuple(c.shape))
    return to_dtype(shift(decode_codes(idx, c_hat, atoms), mean, 1.0), x.dtype)


# ---------------------------------------------------------------- key space


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
    layer: int | None = None,
    adaptive: bool = False,
    sets: bool = True,
) -> torch.Tensor:
    """Keys k [B, H, T, D] of layer `layer` as stored in a cache -> what decompress returns for them.

    `rope_info` = {'inv_freq': [...], 'scaling': s, 'layers': [...]?} (the cache meta's `rope`,
    models.rope_info); keys sit at positions positions_offset + 0..T-1. Needed only when key
    spaces differ; `layer` picks the layer's rotation (needed when rope_info has 'layers').
    """
    return roundtrip_keys_code(k, atoms, sparsity, coef, method, positions_offset, rope_info, key_space, cache_key_space, mean, layer,
                               adaptive, sets)[0]


def roundtrip_keys_code(
    k: torch.Tensor, atoms: torch.Tensor, sparsity: int, coef: str = "fp8", method: str = "omp", positions_offset: int = 0,
    rope_info: dict | None = None, key_space: str = "pre-rope", cache_key_space: str = "post-rope", mean: torch.Tensor | None = None,
    layer: int | None = None, adaptive: bool = False, sets: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """roundtrip_keys, and the decoded keys in the dictionaries' key space (float32; what cross-layer prediction reads)."""
    rope_p = None
    if key_space != cache_key_space:
        rope_p = RopeParams.from_meta({"rope": rope_info, "position_offset": positions_offset})
        rope_p = rope_p if layer is None else rope_p.for_layer(layer)
    kc = to_code_space(k, key_space, cache_key_space, rope_p)
    code = roundtrip(kc.to(torch.float32), atoms, sparsity, coef, method, mean, adaptive, "k", sets)
    return to_dtype(from_code_space(code, key_space, cache_key_space, rope_p), k.dtype), code


# ---------------------------------------------------------------- sections (tensors; formats/csrsection.py makes the bytes)


@dataclass(frozen=True)
class SectionCodes:
    """One key or value section of a layer as tensors (docs/format.md §3)."""

    idx: torch.Tensor  # [B, H, Tc, C, S] int64 atom indices
    q: torch.Tensor  # [B*H, Tc, C*S] stored coefficients (float16, float8_e4m3fn or int8; int4/int3 held as int8)
    g: torch.Tensor  # [B*H] float32 group scales
    v: torch.Tensor | None  # [B*H, Tc] vector scales: float16 (int8), float8_e4m3fn (int4, int3), else None
    verbatim: torch.Tensor  # [B, H, s + w, D] the sink then the tail tokens, in the cache's dtype
    counts: torch.Tensor | None = None  # [B, H, Tc, C] atoms used per vector chunk (adaptive codes; idx/q hold S_max slots, zero past a count)


def encode_section(
    x_code: torch.Tensor, x_tail: torch.Tensor, atoms: torch.Tensor, sparsity: int, coef: str, method: str, mean: torch.Tensor | None = None,
    adaptive: bool = False, kind: str = "k", sets: bool = True,
) -> SectionCodes:
    """Codes of the coded tokens x_code [B, H, Tc, D] (code space, float; `mean` subtracted here) and the
    verbatim tokens x_tail [B, H, s + w, D] of a key ("k") or value ("v") section. CsrError when the
    values are too large to code."""
    _, c, n, dc = atoms.shape
    b, h, tc, _ = x_code.shape
    adaptive = adaptive_for(adaptive, sparsity)
    if tc:
        if not bool(torch.isfinite(x_code.to(torch.float32).pow(2).sum(-1)).all()):
            _too_large(x_code)  # adaptive counts rank vectors by their squared errors: these would overflow
        idx, cf, counts = encode_counted(shift(x_code.to(torch.float32), mean, -1.0), atoms, sparsity, method, adaptive, coef, kind, sets)
    else:
        idx, cf = no_codes(b, h, c, adaptive_max(sparsity, dc, n) if adaptive else sparsity)
        counts = idx.new_zeros(b, h, 0, c) if adaptive else None
    fmt = section_format(coef, kind, sparsity, dc)
    codes = quantized_section(idx, cf, x_tail, fmt, counts)
    if not finite_coefficients(codes, fmt):
        _too_large(x_code)
    return codes


def _too_large(x_code: torch.Tensor) -> None:
    big = float(x_code.abs().max()) if x_code.numel() else 0.0
    raise CsrError(
        f"values too large to code (max |x| = {big:.3g}; the coefficients overflow float32): "
        "the cache looks broken, check it or keep such layers out of the cache"
    )


def no_codes(b: int, h: int, c: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """idx, coef [B, H, 0, C, S] of a section with no coded tokens (the cache fits in sink + window)."""
    return torch.zeros(b, h, 0, c, s, dtype=torch.int64), torch.zeros(b, h, 0, c, s)


def quantized_section(idx: torch.Tensor, cf: torch.Tensor, verbatim: torch.Tensor, coef: str, counts: torch.Tensor | None = None) -> SectionCodes:
    """A section (on the CPU) from codes idx, cf [B, H, Tc, C, S] (float coefficients, quantised here to `coef`, the
    side's one format, with one
    scale per (b, h) as the file stores them), the verbatim tokens [B, H, s + w, D] and, for adaptive
    codes, the counts [B, H, Tc, C]."""
    q, g, v = quantize_codes(cf, coef)
    return SectionCodes(idx.to(torch.int64).cpu(), q.cpu(), g.to(torch.float32).cpu(), None if v is None else v.cpu(),
                        verbatim.contiguous().cpu(), None if counts is None else counts.to(torch.int64).cpu())


def finite_coefficients(codes: SectionCodes, coef: str) -> bool:
    cf = packing.dequantize(codes.q, codes.g, codes.v, coef)
    return bool(torch.isfinite(codes.g).all() and torch.isfinite(cf).all())


def decode_section(codes: SectionCodes, atoms: torch.Tensor, coef: str, mean: torch.Tensor | None = None) -> torch.Tensor:
    """Coded tokens float32 [B, H, Tc, D] in code space. CsrError on non-finite scales or coefficients."""
    b, h, tc, c, s = codes.idx.shape
    cf = packing.dequantize(codes.q, codes.g, codes.v, coef)
    if not (torch.isfinite(codes.g).all() and torch.isfinite(cf).all()):
        raise CsrError("corrupted codes (non-finite coefficient or scale)")
    return shift(decode_codes(codes.idx, cf.reshape(b, h, tc, c, s), atoms), mean, 1.0)


def to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x cast to `dtype`, clamped to its finite range: a float16 cache near ±65504 decodes to ±65504, never Inf."""
    if x.dtype == dtype:
        return x
    lim = torch.finfo(dtype).max
    return x.clamp(-lim, lim).to(dtype)


# ---------------------------------------------------------------- one layer


def encode_layer(
    k: torch.Tensor,
    v: torch.Tensor,
    atoms_k: torch.Tensor,
    atoms_v: torch.Tensor,
    cfg: CodecConfig,
    key_space: str,
    cache_key_space: str,
    rope_p: RopeParams | None,
    means: tuple = (None, None),
    decoded: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[SectionCodes, SectionCodes]:
    """Key and value section codes of one layer: k, v [B, H, T, D] as in the cache; `means` the dictionaries' (K, V),
    each a tensor, None or a function giving one, called just before its side is coded (values after the keys).
    `decoded(kind, x [B, H, Tc, D])`, if given, receives each side's coded tokens decoded in code space right after
    it is coded: what decode_layer will give (cross-layer prediction reads them)."""
    _check_atoms(tuple(k.shape), atoms_k, "cache's keys")
    _check_atoms(tuple(v.shape), atoms_v, "cache's values")
    if atoms_k.shape[1] != 1:
        raise CsrError(f"key dictionaries must have 1 channel chunk, got {atoms_k.shape[1]}: use a dictionary from csrtool train-dict")
    s, tc, _ = spans(k.shape[2], cfg.window, cfg.sink)
    kc = to_code_space(k[:, :, s : s + tc], key_space, cache_key_space, None if rope_p is None else rope_p.shifted(s))
    if not bool(torch.isfinite(kc).all()):
        raise CsrError(
            f"keys too large to rotate into the dictionary's key space (max |k| = {float(k.abs().max()):.3g}; "
            "RoPE overflows float32): the cache looks broken, check it"
        )
    mk = _resolve(means[0])
    ck = encode_section(kc, _verbatim(k, s, tc), atoms_k, cfg.sparsity_k, cfg.coef, cfg.method, mk, cfg.adaptive, "k", cfg.set_indices)
    if decoded is not None:
        decoded("k", decode_section(ck, atoms_k, cfg.section_coef("k", atoms_k.shape[-1]), mk))
    mv = _resolve(means[1])
    cv = encode_section(v[:, :, s : s + tc].to(torch.float32), _verbatim(v, s, tc), atoms_v, cfg.sparsity_v, cfg.coef, cfg.method, mv,
                        cfg.adaptive, "v", cfg.set_indices)
    if decoded is not None:
        decoded("v", decode_section(cv, atoms_v, cfg.section_coef("v", atoms_v.shape[-1]), mv))
    return ck, cv


def _resolve(mean):
    """A side's offset: given, or computed now by the function given (encode_layer / decode_layer's `means`)."""
    return mean() if callable(mean) else mean


def _verbatim(x: torch.Tensor, s: int, tc: int) -> torch.Tensor:
    """The tokens a section stores as they are: the s sink tokens, then the tail after the coded ones."""
    return torch.cat([x[:, :, :s], x[:, :, s + tc :]], dim=2)


def decode_layer(
    ck: SectionCodes,
    cv: SectionCodes,
    atoms_k: torch.Tensor,
    atoms_v: torch.Tensor,
    cfg: CodecConfig,
    key_space: str,
    cache_key_space: str,
    rope_p: RopeParams | None,
    dtype: torch.dtype,
    means: tuple = (None, None),
    decoded: Callable[[str, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of encode_layer (its `means` and `decoded` alike): k, v [B, H, T, D] in `dtype` (clamped to its finite range)."""
    s, _, _ = spans(ck.idx.shape[2] + ck.verbatim.shape[2], cfg.window, cfg.sink)
    kc = decode_section(ck, atoms_k, cfg.section_coef("k", atoms_k.shape[-1]), _resolve(means[0]))
    if decoded is not None:
        decoded("k", kc)
    vc = decode_section(cv, atoms_v, cfg.section_coef("v", atoms_v.shape[-1]), _resolve(means[1]))
    if decoded is not None:
        decoded("v", vc)
    kc = from_code_space(kc, key_space, cache_key_space, None if rope_p is None else rope_p.shifted(s))
    k = torch.cat([ck.verbatim[:, :, :s], to_dtype(kc, dtype), ck.verbatim[:, :, s:]], dim=2)
    v = torch.cat([cv.verbatim[:, :, :s], to_dtype(vc, dtype), cv.verbatim[:, :, s:]], dim=2)
    return k, v
