"""csrtool.calibration.allocate: greedy bit allocation over hand-computed curves, error curves, budgets."""

from __future__ import annotations

import pytest
import torch

from csrtool import codec
from csrtool.calibration import allocate
from csrtool.errors import CsrError

N, D = 1024, 64  # 10-bit indices + fp8 coefficients: 18 bits per atom, no vector scale


def bits_of(plan) -> float:
    return sum(codec.vector_bits(N, sk, 1, "fp8") + codec.vector_bits(N, sv, 1, "fp8") for sk, sv in plan) / (2 * D * len(plan))


def test_greedy_order_by_gain_per_bit():
    # gains: k 1->2: 6, v 1->2: 2, k 2->3: 1.5, v 2->3: 0.5, k 3->4: 0.1 (equal costs)
    curves = {(0, "k"): [10, 4, 2.5, 2.4], (0, "v"): [10, 8, 7.5, 7.4]}
    five = 5 * 18 / (2 * D)
    assert allocate.allocate(curves, [0], five, N, D, 1, "fp8") == [(3, 2)]
    assert allocate.allocate(curves, [0], five - 1e-3, N, D, 1, "fp8") == [(2, 2)]
    assert allocate.allocate(curves, [0], 3 * 18 / (2 * D), N, D, 1, "fp8") == [(2, 1)]
    # budget beyond every curve's end: each kind stops at its last point
    assert allocate.allocate(curves, [0], 4.0, N, D, 1, "fp8") == [(4, 4)]


def test_narrow_values_are_priced_per_atom_count():
    """fp8/int4: a value atom costs 10 + 4 bits (plus 8 for the vector's scale) up to D/8 = 8 atoms; the 9th moves
    the section to fp8, re-pricing all 9 at 18 bits (a step of 9·18 - (8·14 + 8) = 42 bits)."""
    curves = {(0, "k"): [1.0], (0, "v"): [float(32 - i) for i in range(32)]}  # the keys stop at one atom
    at8 = 18 + 8 * 14 + 8  # one key atom (fp8) + 8 int4 value atoms
    assert allocate.allocate(curves, [0], at8 / (2 * D), N, D, 1, "fp8/int4") == [(1, 8)]
    assert allocate.allocate(curves, [0], (at8 + 41) / (2 * D), N, D, 1, "fp8/int4") == [(1, 8)]
    assert allocate.allocate(curves, [0], (at8 + 42) / (2 * D), N, D, 1, "fp8/int4") == [(1, 9)]
    assert codec.bits_per_channel(N, D, 1, 9, 1, "fp8/int4") == (at8 + 42) / (2 * D)


def test_sensitive_layers_get_more_atoms_within_budget():
    shape = [1.0 / s for s in range(1, 33)]
    curves = {}
    for layer, weight in enumerate([0.01, 1.0, 0.01, 0.3]):
        curves[(layer, "k")] = [weight * v for v in shape]
        curves[(layer, "v")] = [0.5 * weight * v for v in shape]
    plan = allocate.allocate(curves, [0, 1, 2, 3], 1.0, N, D, 1, "fp8")
    assert bits_of(plan) <= 1.0
    assert bits_of(plan) > 1.0 - 2 * 18 / (2 * D * 4)  # at most one atom's worth unspent
    assert plan[1][0] > plan[3][0] > plan[0][0] and plan[0] == plan[2]
    assert all(sk >= sv for sk, sv in plan)  # keys weigh twice the values here


def test_value_split_counts_every_chunk():
    curves = {(0, "k"): [1.0, 0.9], (0, "v"): [1.0, 0.0]}
    # value_split 2: one more value atom costs 2 x 18 bits; the budget has room for 1.5 atoms over the minimum
    base = 18 + 2 * 18
    plan = allocate.allocate(curves, [0], (base + 27) / (2 * D), N, D, 2, "fp8")
    assert plan == [(2, 1)]
    plan = allocate.allocate(curves, [0], (base + 36) / (2 * D), N, D, 2, "fp8")
    assert plan == [(1, 2)]


def test_budget_below_one_atom_and_missing_curve():
    curves = {(0, "k"): [1.0], (0, "v"): [1.0]}
    with pytest.raises(CsrError, match=r"--bits 0.1 is below the smallest code \(0.2812 bits per channel"):
        allocate.allocate(curves, [0], 0.1, N, D, 1, "fp8")
    with pytest.raises(CsrError, match="no distortion curve for layer 1 \\(k\\)"):
        allocate.allocate(curves, [0, 1], 1.0, N, D, 1, "fp8")


def test_plan_without_calibration_is_none_and_curves_round_trip():
    assert allocate.plan({}, 2, 1.0, N, D, 1, "fp8") is None
    sens = {"curves": {"layer.0.k": [3, 1], "layer.0.v": [2, 1], "layer.1.k": [1, 0.5], "layer.1.v": [1, 0.9]}}
    assert allocate.curves_from(sens)[(1, "v")] == [1.0, 0.9]
    assert allocate.plan(sens, 2, 2 * 18 / (2 * D) + 18 / (2 * D * 2), N, D, 1, "fp8") == ((2, 1), (1, 1))


def test_error_curve_of_exactly_sparse_vectors():
    atoms = torch.eye(8)[None, None]  # [G=1, C=1, N=8, D=8]: orthonormal, MP is exact
    x = torch.zeros(1, 1, 3, 8)
    x[0, 0, :, 0], x[0, 0, :, 5] = 3.0, 1.0  # energy 10 per vector: the 3-atom goes first
    errs = allocate.error_curve(x, atoms, 3)
    assert errs[0] == pytest.approx(0.1) and errs[1] == pytest.approx(0.0, abs=1e-12) and errs[2] == pytest.approx(0.0, abs=1e-12)
    assert allocate.loss_curve(0.02, errs, 1) == pytest.approx([0.02, 0.0, 0.0], abs=1e-12)
    prefixes = allocate.prefix_reconstructions(x, atoms, 2)
    assert prefixes.shape == (2, 1, 1, 3, 8) and torch.equal(prefixes[1], x)
