"""Spend a bit budget across layers and K/V where the model's loss is most sensitive.

A uniform sparsity gives every layer the same atoms, but layers differ widely in
how much coding them alone costs in perplexity (docs/quality.md §5). So each dictionary set carries, per layer and kind, a
loss curve: the KL divergence its coded keys (or values) alone cause at the
reference sparsity (csrtool.calibration.sensitivity), scaled by its relative error at
S = 1, 2, ... atoms (KL grows like the error energy for small errors),

    D(S) = KL(S_ref) · err(S) / err(S_ref)

and the budget goes greedily to the step with the largest drop of D per bit.

    error_curve(x [B, H, T, D], atoms, s_max) -> relative error at 1..s_max atoms
    loss_curve(kl, errors, s_ref) -> D(1..s_max)
    allocate(curves {(layer, kind): [...]}, layers, bits, n_atoms, head_dim, value_split, coef) -> [(s_k, s_v)] per layer
    plan(sensitivity, n_layers, bits, ...) -> per-layer (s_k, s_v), or None without calibration
    check_dicts(dicts, n_layers, kv_heads, head_dim) -> (N atoms, value split C), or CsrError
    codec_plan(dicts, n_layers, kv_heads, head_dim, *, bits | sparsity, coef, method, window, sink, uniform)
        -> codec.CodecConfig: THE policy turning a budget into sparsities (compress, eval, calibrate, cache)
"""

from __future__ import annotations

import heapq
import math

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.formats.dicts import DictSet, dict_name, parse_dict_name


def error_curve(x: torch.Tensor, atoms: torch.Tensor, s_max: int, mean: torch.Tensor | None = None) -> list[float]:
    """Relative squared error of x [B, H, T, D] (code space) coded with 1..s_max atoms (MP prefixes),
    the dictionary's `mean` [G, D] subtracted first (error relative to x itself)."""
    x = x.float()
    energy = float(x.pow(2).sum())
    xc = codec.shift(x, mean, -1.0)
    return [float((xc - r).pow(2).sum()) / energy for r in prefix_reconstructions(xc, atoms, s_max)]


def loss_curve(kl: float, errors: list[float], s_ref: int) -> list[float]:
    """D(S) = KL measured at s_ref atoms, scaled by the error curve (KL grows like the error energy)."""
    ref = errors[s_ref - 1]
    return [kl * e / ref if ref > 0 else 0.0 for e in errors]


def curves_from(sensitivity: dict) -> dict[tuple[int, str], list[float]]:
    """{(layer, kind): D(1..S_max)} from a dictionary file's `sensitivity` metadata (csrtool.calibration.calibrate)."""
    out = {}
    for name, curve in (sensitivity.get("curves") or {}).items():
        out[parse_dict_name(name)] = [float(v) for v in curve]
    return out


def plan(sensitivity: dict, n_layers: int, bits: float, n_atoms: int, head_dim: int, value_split: int, coef: str) -> tuple[tuple[int, int], ...] | None:
    """Per-layer sparsities for `bits` from calibrated dictionaries; None when they carry no curves."""
    curves = curves_from(sensitivity)
    if not curves:
        return None
    return tuple(allocate(curves, list(range(n_layers)), bits, n_atoms, head_dim, value_split, coef))


def check_dicts(dicts: DictSet, n_layers: int, kv_heads: int, head_dim: int) -> tuple[int, int]:
    """Check the dictionaries fit a cache of n_layers x kv_heads x head_dim; return (N atoms, value split C)."""
    missing = [layer for layer in range(n_layers) if any(dict_name(layer, kind) not in dicts.atoms for kind in ("k", "v"))]
    if missing:
        raise CsrError(
            f"the dictionary file covers layers {dicts.layers} but the model has {n_layers} (missing {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}): train dictionaries for every layer (csrtool train-dict without --layers)"
        )
    n_atoms = dicts.n_atoms
    value_split = None
    for name, a in dicts.atoms.items():
        codec._check_atoms((1, kv_heads, 1, head_dim), a, f"model (dictionary {name})")
        _, c, n, _ = a.shape
        if n != n_atoms:
            raise CsrError(f"dictionary {name} has {n} atoms, others {n_atoms}: re-run csrtool train-dict")
        if name.endswith(".v"):
            if value_split not in (None, c):
                raise CsrError(f"value dictionaries disagree on the channel split ({value_split} vs {c}): re-run csrtool train-dict")
            value_split = c
    return n_atoms, value_split or 1


def codec_plan(
    dicts: DictSet,
    n_layers: int,
    kv_heads: int,
    head_dim: int,
    *,
    bits: float | None = None,
    sparsity: tuple[int, int] | None = None,
    coef: str = "fp8",
    method: str = "omp",
    window: int | None = None,
    sink: int | None = None,
    uniform: bool = False,
    adaptive: bool = False,
) -> codec.CodecConfig:
    """The codec configuration for a cache of n_layers x kv_heads x head_dim coded with `dicts`.

    Exactly one of `bits` (code bits per channel, K and V averaged) and `sparsity`
    ((s_k, s_v), every layer the same) is given. With `bits`, dictionaries that carry
    train-dict's sensitivity calibration for exactly these layers get per-layer
    sparsities (`plan`; the config's sparsity_k/v are then the maxima), unless
    `uniform`; otherwise every layer gets `codec.choose_sparsity`'s pair. `adaptive`: per-vector
    atom counts within each layer's budget (codec.encode_counted). window/sink None: the codec's defaults."""
    if (bits is None) == (sparsity is None):
        raise CsrError("pass either --bits or --sparsity, not both" if bits is not None else "give a bit budget (--bits) or explicit sparsities (--sparsity)")
    n_atoms, value_split = check_dicts(dicts, n_layers, kv_heads, head_dim)
    per_layer = None
    if sparsity is not None:
        s_k, s_v = sparsity
    else:
        codec.coef_sides(coef)  # a format that does not exist is its own error
        try:
            s_k, s_v = codec.choose_sparsity(bits, n_atoms, head_dim, value_split, coef)
        except CsrError:
            if not (bits > 0 and math.isfinite(bits)):
                raise
            least = codec.bits_per_channel(n_atoms, head_dim, 1, 1, value_split, coef)
            raise CsrError(
                f"--bits {bits:g} cannot be met with these dictionaries: one atom for K and V costs {least:.4f} bits per channel "
                f"({n_atoms} atoms, {coef} coefficients): raise --bits"
            ) from None
        if not uniform and len(dicts.layers) == n_layers:
            per_layer = plan(dicts.sensitivity, n_layers, bits, n_atoms, head_dim, value_split, coef)
        if per_layer is not None:
            s_k, s_v = max(p[0] for p in per_layer), max(p[1] for p in per_layer)
    return codec.CodecConfig(
        s_k, s_v, coef, method, codec.DEFAULT_WINDOW if window is None else window, codec.DEFAULT_SINK if sink is None else sink,
        layer_sparsity=per_layer, adaptive=adaptive,
    )


def _monotone(curve: list[float]) -> list[float]:
    """Running minimum: one more atom never costs quality (OMP never raises the error)."""
    best, out = float("inf"), []
    for v in curve:
        best = min(best, v)
        out.append(best)
    return out


def allocate(
    curves: dict[tuple[int, str], list[float]],
    layers: list[int],
    bits: float,
    n_atoms: int,
    head_dim: int,
    value_split: int,
    coef: str,
) -> list[tuple[int, int]]:
    """Per-layer (s_k, s_v) whose mean code bits per channel fit `bits`, minimising Σ D.

    Every layer gets at least one atom per kind; then, while the budget allows, the
    (layer, kind) whose next atom lowers its curve the most per bit gets it. Beyond a
    curve's end a kind gets no more atoms."""
    for layer in layers:
        for kind in ("k", "v"):
            if not curves.get((layer, kind)):
                raise CsrError(f"the dictionary file has no distortion curve for layer {layer} ({kind}): re-run csrtool train-dict")
    def bits_at(kind: str, s: int) -> int:  # one vector's bits at s atoms (the section's format may change with s)
        return codec.side_bits(n_atoms, kind, s, head_dim, value_split, coef)

    def cost(key: tuple[int, str]) -> int:  # the next atom's bits
        return bits_at(key[1], s[key] + 1) - bits_at(key[1], s[key])

    budget = bits * 2 * head_dim * len(layers)  # bits per token and head, summed over layers
    s = {(layer, kind): 1 for layer in layers for kind in ("k", "v")}
    spent = sum(bits_at(kind, 1) for (_, kind) in s)
    if spent > budget + 1e-9:
        least = spent / (2 * head_dim * len(layers))
        raise CsrError(f"--bits {bits} is below the smallest code ({least:.4f} bits per channel with one atom for K and V): raise --bits")
    mono = {key: _monotone(c) for key, c in curves.items() if key in s}

    def gain(key: tuple[int, str]) -> float:
        c, n = mono[key], s[key]
        return (c[n - 1] - c[n]) / cost(key) if n < len(c) else -1.0

    heap = [(-gain(key), key) for key in sorted(s)]
    heapq.heapify(heap)
    while heap:
        g, key = heapq.heappop(heap)
        if -g < 0:
            break
        step = cost(key)
        if spent + step > budget + 1e-9:
            continue  # this kind's atom no longer fits; a cheaper kind's still may
        s[key] += 1
        spent += step
        heapq.heappush(heap, (-gain(key), key))
    return [(s[(layer, "k")], s[(layer, "v")]) for layer in layers]


def prefix_reconstructions(x: torch.Tensor, atoms: torch.Tensor, s_max: int) -> torch.Tensor:
    """x [B, H, T, D] (code space) -> [s_max, B, H, T, D]: matching pursuit with 1..s_max atoms.

    One MP run at s_max gives every shorter code as a prefix (MP never revisits a
    coefficient), so a whole curve costs one encode. Coefficients unquantised."""
    idx, cf = codec.encode_codes(x, atoms, s_max, "mp")
    return torch.stack([codec.decode_codes(idx[..., :s], cf[..., :s], atoms) for s in range(1, s_max + 1)])
