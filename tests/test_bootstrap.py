"""Paired block bootstrap: hand-computed cases and properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csrtool.errors import CsrError
from csrtool.eval.bootstrap import Interval, Resampler, blocks_of, verdict


def test_blocks_respect_document_boundaries():
    # doc 0: 5 positions, doc 1: 3, doc 2: 0, block 2 -> [0,2) [2,4) [4,5) | [5,7) [7,8)
    assert blocks_of([5, 3, 0], block=2) == [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 5, 7), (1, 7, 8)]


def test_weights_draw_each_document_its_own_blocks():
    r = Resampler([5, 3], block=2, reps=500, seed=3)
    w = r.weights
    assert torch.equal(w[:, :3].sum(1), torch.full((500,), 3.0))  # doc 0 draws its 3 blocks
    assert torch.equal(w[:, 3:].sum(1), torch.full((500,), 2.0))  # doc 1 its 2
    assert (w[:, :3].sum(0) > 0).all() and (w[:, 3:].sum(0) > 0).all()


def test_point_estimates_hand_computed():
    ref = [1.0, 2.0, 3.0, 4.0]
    meth = [1.5, 2.0, 3.5, 4.0]  # Σ diff = 1 over 4 positions
    r = Resampler([4], block=2, reps=200, seed=0)
    assert r.ppl_increase(ref, meth).point == pytest.approx(math.expm1(0.25))
    assert r.mean([0.0, 1.0, 2.0, 3.0]).point == pytest.approx(1.5)
    # a twice-as-bad method: ratio of rises
    worse = [2.0, 2.0, 4.0, 4.0]
    ratio = r.ratio(ref, meth, worse)
    assert ratio.point == pytest.approx(math.expm1(0.25) / math.expm1(0.5))


def test_single_block_has_no_spread():
    # one block per document: every replicate redraws the same block, so the interval is the point
    r = Resampler([4, 4], block=4, reps=50, seed=1)
    iv = r.ppl_increase([0.0] * 8, [0.1] * 4 + [0.3] * 4)
    assert iv.lo == pytest.approx(iv.point) and iv.hi == pytest.approx(iv.point)
    assert iv.point == pytest.approx(math.expm1(0.2))


def test_hand_computed_two_blocks():
    # blocks with mean differences 0 and 1 (equal sizes): replicate means are 0, 0.5 or 1
    r = Resampler([4], block=2, reps=4000, seed=0)
    iv = r.ppl_increase([0.0] * 4, [0.0, 0.0, 1.0, 1.0])
    assert iv.point == pytest.approx(math.expm1(0.5))
    assert iv.lo == pytest.approx(0.0) and iv.hi == pytest.approx(math.expm1(1.0))


def test_pooled_runs_add_the_training_noise():
    """Several trainings of one method: the point is the mean log rise over runs; with one block per document the
    positions add no spread, so the interval is exactly what drawing the runs gives."""
    r = Resampler([4, 4], block=4, reps=4000, seed=1)
    ref = [0.0] * 8
    runs = [[0.1] * 8, [0.3] * 8]  # two trainings: log rises 0.1 and 0.3
    iv = r.pooled_increase(ref, runs)
    assert iv.point == pytest.approx(math.expm1(0.2))
    assert iv.lo == pytest.approx(math.expm1(0.1)) and iv.hi == pytest.approx(math.expm1(0.3))  # draws: both runs 0.1 or 0.3
    # against a baseline trained once (log rise 0.4), on the same positions
    ratio = r.pooled_ratio(ref, runs, [0.4] * 8)
    assert ratio.point == pytest.approx(math.expm1(0.2) / math.expm1(0.4))
    assert ratio.hi == pytest.approx(math.expm1(0.3) / math.expm1(0.4))
    # one run: exactly ppl_increase, positions' noise only
    g = torch.Generator().manual_seed(0)
    ref, meth = torch.rand(300, generator=g).tolist(), torch.rand(300, generator=g).tolist()
    r = Resampler([100, 200], reps=500, seed=2)
    assert r.pooled_increase(ref, [meth]) == r.ppl_increase(ref, meth)
    # identical runs: the same interval as one
    assert r.pooled_increase(ref, [meth, meth, meth]) == r.ppl_increase(ref, meth)
    with pytest.raises(CsrError, match="at least one run"):
        r.pooled_increase(ref, [])
    # a per-position mean (KL) over runs: one run is exactly `mean`; two constant runs give their mean, drawn
    assert r.pooled_mean([meth]) == r.mean(meth)
    two = Resampler([4, 4], block=4, reps=4000, seed=1).pooled_mean([[0.02] * 8, [0.06] * 8])
    assert two.point == pytest.approx(0.04) and two.lo == pytest.approx(0.02) and two.hi == pytest.approx(0.06)


def test_deterministic_and_seeded():
    g = torch.Generator().manual_seed(0)
    ref, meth = torch.rand(300, generator=g), torch.rand(300, generator=g)
    a = Resampler([100, 200], reps=300, seed=5).ppl_increase(ref, meth)
    b = Resampler([100, 200], reps=300, seed=5).ppl_increase(ref, meth)
    c = Resampler([100, 200], reps=300, seed=6).ppl_increase(ref, meth)
    assert a == b and a != c


def test_verdicts():
    assert verdict(Interval(0.01, 0.005, 0.019), 0.02) == "met"
    assert verdict(Interval(0.025, 0.006, 0.05), 0.02) == "not shown"
    assert verdict(Interval(0.05, 0.03, 0.07), 0.02) == "not met"
    assert verdict({"point": 0.5, "lo": None, "hi": None}, 0.02) == "not shown"


def test_bad_inputs_name_the_problem():
    with pytest.raises(CsrError, match="block"):
        blocks_of([3], block=0)
    with pytest.raises(CsrError, match="3 per-position values for 4"):
        Resampler([4], reps=2).mean([1.0, 2.0, 3.0])


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 150), min_size=1, max_size=4),
    block=st.integers(1, 70),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_properties(lengths, block, seed, data):
    n = sum(lengths)
    vals = st.floats(0.0, 12.0, allow_nan=False, allow_infinity=False)
    ref = data.draw(st.lists(vals, min_size=n, max_size=n))
    meth = data.draw(st.lists(vals, min_size=n, max_size=n))
    r = Resampler(lengths, block=block, reps=64, seed=seed)
    same = r.ppl_increase(ref, ref)  # an identical method: exactly [0, 0]
    assert (same.point, same.lo, same.hi) == (0.0, 0.0, 0.0)
    iv = r.ppl_increase(ref, meth)
    assert iv.lo <= iv.point <= iv.hi  # covers its point estimate
    assert iv.point == pytest.approx(math.exp((sum(meth) - sum(ref)) / n) - 1, rel=1e-9, abs=1e-12)
    kl = r.mean(meth)
    assert min(meth) - 1e-9 <= kl.lo <= kl.point <= kl.hi <= max(meth) + 1e-9
    # no block crosses a document boundary
    bounds = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    for d, a, b in r.blocks:
        assert bounds[d] <= a < b <= bounds[d + 1] and b - a <= block
