"""NeuralDict and k-means: the learning rule, its pieces, and that training helps on held-out data."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from csrtool.engine import pursuit
from csrtool.engine.kmeans import assign, kmeans, kmeans_pp, kmeans_pp_batched
from csrtool.engine.neuraldict import (
    TrainConfig, coefficients, diversity_beta, diversity_loss, reconstruct, rel_err, train_dictionary,
)
from csrtool.errors import CsrError


def sparse_data(b: int, d: int = 16, n0: int = 40, s0: int = 2, seed: int = 0, noise: float = 0.02) -> torch.Tensor:
    """Rows = s0-sparse combinations of n0 fixed random unit atoms (the same atoms for every seed) plus noise."""
    atoms = torch.nn.functional.normalize(torch.randn(n0, d, generator=torch.Generator().manual_seed(1234)), dim=1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n0, generator=g)[:s0] for _ in range(b)])
    coef = torch.randn(b, s0, generator=g) * torch.linspace(2.0, 0.7, s0)
    return torch.einsum("bs,bsd->bd", coef, atoms[idx]) + noise * torch.randn(b, d, generator=g)


SMALL = dict(atoms=48, sparsity=2, batch_size=128, lr=1e-2, kmeans_iters=3)


def test_training_beats_kmeans_init_and_random_samples():
    x, test = sparse_data(800, seed=0), sparse_data(400, seed=1)
    trained, stats = train_dictionary(x, TrainConfig(**SMALL, epochs=6, patience=6), seed=0)
    init, _ = train_dictionary(x, TrainConfig(**SMALL, epochs=0), seed=0)
    samples, _ = train_dictionary(x, TrainConfig(**SMALL, epochs=0, init="samples"), seed=0)
    err = {name: rel_err(test, reconstruct(test, a, 2, "omp")) for name, a in
           {"trained": trained, "kmeans": init, "samples": samples}.items()}
    assert err["trained"] < 0.8 * err["kmeans"], err
    assert err["trained"] < 0.5 * err["samples"], err
    assert stats["val_rel_err"] < stats["init_val_rel_err"]
    assert 0 <= stats["train_rel_err"] < 1 and stats["epochs"] >= 1


@pytest.mark.parametrize("encoder", ["mp", "omp"])
def test_atoms_unit_norm_and_deterministic(encoder):
    x = sparse_data(400)
    cfg = TrainConfig(**{**SMALL, "atoms": 32}, encoder=encoder, epochs=3)
    a1, s1 = train_dictionary(x, cfg, seed=7)
    a2, s2 = train_dictionary(x, cfg, seed=7)
    assert a1.shape == (32, 16)
    torch.testing.assert_close(a1.norm(dim=1), torch.ones(32), atol=1e-5, rtol=0)
    assert torch.equal(a1, a2) and s1 == s2


def test_diversity_loss_equals_atom_gram_form():
    a = torch.nn.functional.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    explicit = (torch.eye(50, dtype=torch.float64) - a @ a.T).pow(2).sum() / 50**2  # ‖I − A Aᵀ‖²_F / N²
    torch.testing.assert_close(diversity_loss(a), explicit)
    # minimum over unit atoms (tight frame): Σ_{i≠j} cos² ≥ N²/D − N
    assert float(diversity_loss(a)) >= 1 / 8 - 1 / 50 - 1e-12


def test_beta_rule():
    mse = torch.tensor(0.3, requires_grad=True)
    for l_div, want in [(0.5, 0.06), (0.01, 1.0), (0.03, 1.0), (3.0, 0.01)]:
        beta = diversity_beta(mse, torch.tensor(l_div))
        assert not beta.requires_grad
        assert float(beta) == pytest.approx(min(max(0.1 * 0.3 / l_div, 0.0), 1.0))
        assert float(beta) == pytest.approx(want)


@pytest.mark.parametrize("method", ["omp", "mp"])
def test_differentiable_coefficients_match_pursuit(method):
    atoms = torch.nn.functional.normalize(torch.randn(64, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    x = sparse_data(200, seed=4)
    idx, coef = pursuit.encode(x, atoms, 4, method)
    w = atoms.clone().requires_grad_(True)
    c = coefficients(x, w, idx, method)
    torch.testing.assert_close(c.detach(), coef, atol=1e-4, rtol=1e-4)
    c.sum().backward()  # the gradient reaches the dictionary
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_config_validation_names_the_bad_value():
    with pytest.raises(CsrError, match="atoms must be a positive integer, got 0"):
        TrainConfig(atoms=0)
    with pytest.raises(CsrError, match="sparsity must be between 1 and atoms"):
        TrainConfig(atoms=8, sparsity=9)
    with pytest.raises(CsrError, match="scope must be one of head, layer, got 'model'"):
        TrainConfig(scope="model")
    with pytest.raises(CsrError, match="encoder must be one of mp, omp"):
        TrainConfig(encoder="lasso")
    with pytest.raises(CsrError, match="val_fraction must be in"):
        TrainConfig(val_fraction=1.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().atoms = 3  # frozen


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=1) * 5
    lab = torch.arange(600) % 6
    x = centers[lab] + 0.05 * torch.randn(600, 16, generator=g)
    c = kmeans(x, 6, iters=5, generator=torch.Generator().manual_seed(1), normalize=False)
    dist = torch.cdist(centers, c).min(1).values
    assert float(dist.max()) < 0.1
    # spherical, sign-invariant: x and -x fall in the same cluster; unit centroids
    xs = x * torch.where(torch.arange(600) % 2 == 0, 1.0, -1.0)[:, None]
    cs = kmeans(xs, 12, iters=5, generator=torch.Generator().manual_seed(1))  # over-complete: no local minimum
    torch.testing.assert_close(cs.norm(dim=1), torch.ones(12))
    cos = (torch.nn.functional.normalize(centers, dim=1) @ cs.T).abs().max(1).values
    assert float(cos.min()) > 0.99


def test_argmax_rows_is_argmax_with_ties_to_the_lowest_index():
    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 5, (40, 512), generator=g).float()  # many ties per row
    score[7] = 2.0  # a row of equal values: index 0
    assert torch.equal(pursuit.argmax_rows(score), score.argmax(1))
    odd = torch.randn(9, 100, generator=g)  # no block width divides 100: torch's argmax
    assert torch.equal(pursuit.argmax_rows(odd), odd.argmax(1))


@pytest.mark.parametrize("unit, signed", [(True, True), (True, False), (False, True), (False, False)])
def test_assign_is_the_nearest_centroid_in_any_chunking(unit, signed):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, 8, generator=g)
    c = torch.randn(256, 8, generator=g) * 2
    if unit:
        c = torch.nn.functional.normalize(c, dim=1)
    dist = torch.cdist(x, c).pow(2)
    if signed:
        dist = torch.minimum(dist, torch.cdist(x, -c).pow(2))
    want = dist.argmin(1)
    for chunk in (None, 333, 4096):
        lab, sign = assign(x, c, signed=signed, chunk=chunk)
        assert torch.equal(lab, want), chunk
        near = (x - sign[:, None] * c[lab]).pow(2).sum(1)
        torch.testing.assert_close(near, dist.min(1).values, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("unit, signed", [(True, True), (False, False)])
def test_fast_assign_is_nearly_the_nearest_centroid_with_exact_signs(monkeypatch, unit, signed):
    """bf16 dot products (where the hardware has them; forced here): a near-tie may go to the other centroid, never a
    clearly farther one, and the sign is the exact match's."""
    from csrtool.engine import pursuit

    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 64, generator=g)
    c = torch.randn(2048, 64, generator=g)
    if unit:
        c = torch.nn.functional.normalize(c, dim=1)
    dist = torch.cdist(x, c).pow(2)
    if signed:
        dist = torch.minimum(dist, torch.cdist(x, -c).pow(2))
    lab, sign = assign(x, c, signed=signed, fast=True)
    exact, _ = assign(x, c, signed=signed)
    assert not torch.equal(lab, exact) and (lab == exact).float().mean() > 0.8  # it took the bf16 path
    near = (x - sign[:, None] * c[lab]).pow(2).sum(1)  # a wrong sign would put the row twice as far
    best = dist.min(1).values
    assert bool((near <= best * 1.01 + 1e-4).all())
    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: False)
    assert all(torch.equal(a, b) for a, b in zip(assign(x, c, signed=signed, fast=True), assign(x, c, signed=signed)))


def test_kmeans_pp_distinct_and_seeded():
    x = torch.randn(300, 8)
    a = kmeans_pp(x, 50, torch.Generator().manual_seed(5))
    b = kmeans_pp(x, 50, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.unique().numel() == 50


def test_kmeans_fills_empty_clusters_with_data_rows():
    # 3 directions, 10 copies each, 4 centroids: seeding must repeat a direction, two equal
    # centroids tie and one cluster stays empty; it is refilled with a row, never left at zero
    dirs = torch.nn.functional.normalize(torch.randn(3, 6, generator=torch.Generator().manual_seed(0)), dim=1)
    x = dirs.repeat_interleave(10, dim=0)
    for normalize in (True, False):
        c = kmeans(x, 4, iters=3, generator=torch.Generator().manual_seed(1), normalize=normalize)
        assert c.shape == (4, 6) and bool(torch.isfinite(c).all())
        torch.testing.assert_close(c.norm(dim=1), torch.ones(4))
        match = (c @ dirs.T).abs().max(1).values  # each centroid is (+-) one of the directions
        torch.testing.assert_close(match, torch.ones(4))
        assert len({int(i) for i in (c @ dirs.T).abs().argmax(1)}) == 3  # and all three are covered



def test_kmeans_with_more_than_twice_as_many_centroids_as_rows():
    # 64 centroids from 10 rows: at least 54 clusters stay empty, more than there are rows to refill them with; they
    # take the rows again in turn (this raised "selected index k out of range" from topk before)
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(0))
    for normalize in (True, False):
        c = kmeans(x, 64, iters=2, generator=torch.Generator().manual_seed(1), normalize=normalize)
        assert c.shape == (64, 6) and bool(torch.isfinite(c).all())
        assert bool((c.norm(dim=1) > 0.1).all())  # none left at zero
        if normalize:
            torch.testing.assert_close(c.norm(dim=1), torch.ones(64))
        rows = torch.nn.functional.normalize(x, dim=1)
        cos = (torch.nn.functional.normalize(c, dim=1) @ rows.T).abs()
        assert bool((cos.max(0).values > 0.999).all())  # the refills cover every row


def test_neuraldict_reseeds_dead_and_duplicate_atoms():
    # 16 atoms sampled from 8 directions: at least 8 are duplicates (or never chosen) after epoch 1
    dirs = torch.nn.functional.normalize(torch.randn(8, 12, generator=torch.Generator().manual_seed(0)), dim=1)
    x = dirs.repeat_interleave(40, dim=0) * torch.rand(320, 1, generator=torch.Generator().manual_seed(1)).add(0.5)
    cfg = TrainConfig(atoms=16, sparsity=1, init="samples", epochs=1, batch_size=64, val_fraction=0.0)
    _, stats = train_dictionary(x, cfg, seed=0)
    assert stats["reseeded"] >= 8


def test_reseed_puts_residuals_of_the_worst_rows():
    from csrtool.engine.neuraldict import _reseed

    x = torch.eye(4)[:3] * torch.tensor([[1.0], [2.0], [3.0]])  # rows e0, 2 e1, 3 e2
    w = torch.nn.Parameter(torch.eye(4)[[0, 0, 3]].clone())  # atom 1 duplicates atom 0
    opt = torch.optim.Adam([w], lr=0.1)
    w.grad = torch.ones_like(w)
    opt.step()  # Adam state for every row
    with torch.no_grad():
        w.copy_(torch.eye(4)[[0, 0, 3]])
    err = torch.tensor([0.0, 4.0, 9.0])
    _reseed(w, torch.tensor([1]), x, err, TrainConfig(atoms=3, sparsity=1), opt)
    torch.testing.assert_close(w.detach()[1], torch.tensor([0.0, 0.0, 1.0, 0.0]))  # the worst row (3 e2), normalised
    assert float(opt.state[w]["exp_avg"][1].abs().sum()) == 0.0 and float(opt.state[w]["exp_avg"][0].abs().sum()) > 0
    assert err.tolist() == [0.0, 4.0, 0.0]  # not picked again this epoch


def test_training_stops_after_patience_epochs_without_improvement():
    x = sparse_data(600)
    cfg = TrainConfig(atoms=24, sparsity=2, epochs=40, lr=1e-7, patience=2, batch_size=128)
    _, stats = train_dictionary(x, cfg, seed=0)
    assert stats["epochs"] < cfg.epochs
    assert stats["epochs"] == stats["best_epoch"] + cfg.patience


@pytest.mark.parametrize("signed", [False, True])
def test_kmeans_pp_batched_distinct_seeded_and_spread(signed):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(8, 16, generator=g) * 10
    x = centers[torch.arange(800) % 8] + 0.01 * torch.randn(800, 16, generator=g)
    a = kmeans_pp_batched(x, 8, 4, torch.Generator().manual_seed(5), signed=signed)
    b = kmeans_pp_batched(x, 8, 4, torch.Generator().manual_seed(5), signed=signed)
    assert torch.equal(a, b) and a.unique().numel() == 8
    # D² sampling: once a cluster has a seed its rows are ~never drawn, so 8 seeds in 4 rounds
    # of 2 land in (nearly) all 8 separated clusters
    assert (torch.arange(800)[a] % 8).unique().numel() >= 7


def test_kmeans_pp_batched_duplicates_and_all_rows():
    x = torch.cat([torch.ones(20, 4), -torch.ones(20, 4), torch.zeros(10, 4)])  # 3 distinct rows (2 when signed)
    for signed in (False, True):
        for k in (5, 50):  # more seeds than distinct rows, and every row
            idx = kmeans_pp_batched(x, k, 3, torch.Generator().manual_seed(1), signed=signed)
            assert idx.unique().numel() == k
    idx = kmeans_pp_batched(x, 3, 2, torch.Generator().manual_seed(1))
    assert {tuple(r) for r in x[idx].tolist()} == {(1.0,) * 4, (-1.0,) * 4, (0.0,) * 4}


def test_reported_errors_use_capped_rows(monkeypatch):
    """The held-out and training errors are measured on the first VAL_ERR_ROWS / TRAIN_ERR_ROWS rows only."""
    from csrtool.engine import neuraldict

    monkeypatch.setattr(neuraldict, "VAL_ERR_ROWS", 50)
    monkeypatch.setattr(neuraldict, "TRAIN_ERR_ROWS", 60)
    x, val = sparse_data(300, seed=0), sparse_data(200, seed=1)
    cfg = TrainConfig(**SMALL, epochs=0, max_vectors=300)
    atoms, stats = train_dictionary(x, cfg, seed=0, val=val)
    assert stats["val_rel_err"] == pytest.approx(rel_err(val[:50], reconstruct(val[:50], atoms, 2, "mp")), rel=1e-9)
    assert stats["val_rel_err"] != pytest.approx(rel_err(val, reconstruct(val, atoms, 2, "mp")), rel=1e-6)
    assert stats["val_vectors"] == 200  # the split itself is unchanged
