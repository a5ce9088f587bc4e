"""Bit accounting of CSR codes: what a code costs, how many atoms a budget buys, adaptive slot budgets.

    coef_sides(coef) -> (keys' format, values' format)   a coefficient spec: "fp8", or keys/values "fp8/int3"
    coef_side(coef, kind) -> the format of one side ("k" or "v")
    section_format(coef, kind, S, Dc) -> the format a section of S atoms per Dc-channel chunk stores: the side's,
                                         but fp8 where a narrow one (int4, int3) would have too many atoms
    vector_bits(N, S, C, fmt) -> bits of one coded vector (fmt: one side's format)
    side_bits(N, kind, S, D, C, coef) -> bits of one coded key or value vector under a spec (its section's format)
    bits_per_channel(N, D, s_k, s_v, C, coef) -> code bits/channel (K and V averaged)
    max_sparsity(D) / check_sparsity(S, D, what, N)      the most atoms worth spending on a vector
    choose_sparsity(bits, N, D, C, coef) -> (s_k, s_v)    fits a bit budget
    adaptive_for(adaptive, S) / adaptive_max(S, D, N) / adaptive_slots(M, S, D, N, fmt) / count_bits(S, D, N)
    adaptive_bits(M, S, D, N, fmt) / adaptive_cost(S, D, N, fmt)   set-coded sections: their bits, a count's cost
                                                          adaptive codes (engine/adaptive.py): where they apply,
                                                          their most atoms per vector, a section's atom slots

csrtool.codec re-exports all of these; the .csr reader and writer, eval and calibration size
everything from them, so a file's size follows from its header alone.
"""

from __future__ import annotations

import math

import torch

from csrtool.engine import adaptive as adaptive_counts
from csrtool.engine import packing, setcode
from csrtool.errors import CsrError

COEF_FORMATS = packing.COEF_FORMATS


def coef_sides(coef: str) -> tuple[str, str]:
    """(keys' format, values' format) of a coefficient spec: one format for both sides ("fp8") or
    keys/values ("fp8/int3"). CsrError for anything else."""
    parts = coef.split("/") if isinstance(coef, str) else []
    parts = parts * 2 if len(parts) == 1 else parts
    if len(parts) != 2 or any(p not in COEF_FORMATS for p in parts):
        raise CsrError(f"coefficient format must be one of {', '.join(COEF_FORMATS)}, or one for keys and one for values "
                       f"written keys/values (e.g. fp8/int3), got {coef!r}")
    return parts[0], parts[1]


def coef_side(coef: str, kind: str) -> str:
    """The coefficient format of the keys ("k") or values ("v") under the spec `coef`."""
    return coef_sides(coef)[0 if kind == "k" else 1]


NARROW_MOST = {"int4": 8, "int3": 16}  # a narrow format codes sections of at most Dc / this many atoms per chunk


def section_format(coef: str, kind: str, sparsity: int, dim: int) -> str:
    """The coefficient format of a key or value section coded with `sparsity` atoms per chunk of `dim` channels.

    The side's format, except that a narrow one (int4, int3: integers on a scale set by the vector's largest
    coefficient) gives way to fp8 beyond dim / NARROW_MOST atoms: its rounding error grows with the atoms
    it rounds, and beyond about dim / 4 (int4) or dim / 8 (int3) atoms in a vector it costs more than the
    atoms it buys; adaptive codes give a vector up to twice S, hence half those (docs/quality.md, tenth pass)."""
    fmt = coef_side(coef, kind)
    if fmt in NARROW_MOST and sparsity > dim // NARROW_MOST[fmt]:
        return "fp8"
    return fmt


def vector_bits(n_atoms: int, sparsity: int, chunks: int, fmt: str) -> int:
    """Bits of one coded vector in the coefficient format `fmt` (one side's): C*S*(index + coefficient) + vector scale."""
    return chunks * sparsity * (packing.index_bits(n_atoms) + packing.COEF_BITS[fmt]) + packing.VECTOR_SCALE_BITS[fmt]


def side_bits(n_atoms: int, kind: str, sparsity: int, head_dim: int, value_split: int, coef: str) -> int:
    """Bits of one coded key ("k") or value ("v") vector of head_dim channels at `sparsity` atoms per chunk (values in
    value_split chunks), in the format its section takes under the spec `coef` (section_format)."""
    chunks = 1 if kind == "k" else value_split
    return vector_bits(n_atoms, sparsity, chunks, section_format(coef, kind, sparsity, head_dim // chunks))


def bits_per_channel(n_atoms: int, head_dim: int, sparsity_k: int, sparsity_v: int, value_split: int, coef: str) -> float:
    """Code bits per channel, keys and values averaged (group scales, padding and tail excluded)."""
    k = side_bits(n_atoms, "k", sparsity_k, head_dim, value_split, coef)
    v = side_bits(n_atoms, "v", sparsity_v, head_dim, value_split, coef)
    return (k + v) / (2 * head_dim)


def max_sparsity(dim: int) -> int:
    """Most atoms worth spending on a vector (chunk) of `dim` channels: dim / 2.

    Beyond it the codes cost more bits than storing the vector in 8 bits, and OMP's
    least-squares fit on a nearly full-rank support turns ill-conditioned: huge
    cancelling coefficients that fp8 and int8 cannot hold (docs/quality.md, "Sparsity cap")."""
    return max(1, dim // 2)


ADAPTIVE_LEAST = 2  # adaptive codes apply where S >= this; at S = 1 the count costs a tenth of the atoms and
                    # the error rises (1.27x on held-out text, 1.19x on another domain; docs/quality.md)


def adaptive_for(adaptive: bool, sparsity: int) -> bool:
    """Whether a side coded at `sparsity` uses adaptive counts in an adaptive plan (S >= ADAPTIVE_LEAST)."""
    return adaptive and sparsity >= ADAPTIVE_LEAST


def adaptive_max(sparsity: int, dim: int, n_atoms: int) -> int:
    """Most atoms an adaptive code gives one vector (chunk) of `dim` channels: twice S, within
    max_sparsity(dim) and the dictionary (never below S)."""
    return max(sparsity, min(2 * sparsity, max_sparsity(dim), n_atoms))


def adaptive_slots(vectors: int, sparsity: int, dim: int, n_atoms: int, fmt: str) -> int:
    """Atoms that `vectors` adaptive codes (chunks of `dim` channels) may use in all: with their count
    fields (count_bits(adaptive_max) each) they cost no more than S fixed atoms per vector. A file
    section stores exactly this many atom slots (docs/format.md §3)."""
    atom_bits = packing.index_bits(n_atoms) + packing.COEF_BITS[fmt]
    return adaptive_counts.slots(vectors, sparsity, atom_bits, adaptive_max(sparsity, dim, n_atoms))


def adaptive_bits(vectors: int, sparsity: int, dim: int, n_atoms: int, fmt: str) -> int:
    """Bits of the atoms of `vectors` adaptive codes with set-coded indices (docs/format.md §3.4): the same
    budget as adaptive_slots' atoms, each vector's indices coded as one sorted multiset (engine/setcode.py),
    so the log2(k!) bits that fixed fields spend on the atoms' order buy more atoms."""
    return adaptive_slots(vectors, sparsity, dim, n_atoms, fmt) * (packing.index_bits(n_atoms) + packing.COEF_BITS[fmt])


def adaptive_cost(sparsity: int, dim: int, n_atoms: int, fmt: str):
    """int64 [S_max + 1]: bits one vector's k = 0..adaptive_max(S) atoms cost, set-coded indices and coefficients."""
    s_max = adaptive_max(sparsity, dim, n_atoms)
    return setcode.cost_table(s_max, packing.index_bits(n_atoms)) + packing.COEF_BITS[fmt] * torch.arange(s_max + 1)


def count_bits(sparsity: int, dim: int, n_atoms: int) -> int:
    """Bits of one adaptive code's atom count."""
    return adaptive_counts.count_bits(adaptive_max(sparsity, dim, n_atoms))


def check_sparsity(sparsity: int, dim: int, what: str, n_atoms: int) -> None:
    """CsrError when `sparsity` atoms exceed the atoms or max_sparsity(dim) for `what` (e.g. "layer 3 keys")."""
    if sparsity > n_atoms:
        raise CsrError(f"sparsity {sparsity} for {what} is more than the dictionary's {n_atoms} atoms: use at most {min(n_atoms, max_sparsity(dim))} (--sparsity)")
    if sparsity > max_sparsity(dim):
        raise CsrError(
            f"sparsity {sparsity} for {what} is more than half its {dim} channels: such codes cost more than "
            f"8-bit storage and their coefficients cannot be quantised (a near full-rank fit): use at most "
            f"{max_sparsity(dim)} (--sparsity) or a lower --bits"
        )


def choose_sparsity(bits: float, n_atoms: int, head_dim: int, value_split: int, coef: str) -> tuple[int, int]:
    """Largest (s_k, s_v) whose average code bits per channel fit `bits`.

    Among the pairs that use the most of the budget, prefer the one whose key cost
    is closest to twice the value cost, then the one with more key atoms: key errors
    pass through the softmax and dominate perplexity (measured splits: docs/quality.md §2).
    """
    coef_sides(coef)  # a bad spec is a CsrError before any search
    if not (bits > 0 and math.isfinite(bits)):
        raise CsrError(f"--bits must be a positive number, got {bits}")
    budget = bits * 2 * head_dim
    best = None
    for s_k in range(1, min(n_atoms, max_sparsity(head_dim)) + 1):
        ck = side_bits(n_atoms, "k", s_k, head_dim, value_split, coef)
        for s_v in range(1, min(n_atoms, max_sparsity(head_dim // value_split)) + 1):
            cv = side_bits(n_atoms, "v", s_v, head_dim, value_split, coef)
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
