"""Pursuit engine: parity with a slow float64 reference loop, and properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from csrtool.engine import pursuit

FORMS = [True, False]  # Gram form, direct form


pytestmark = pytest.mark.usefixtures("one_thread")


# --- the slow, obvious reference: one vector at a time, float64, explicit lstsq ---


def ref_mp(x: torch.Tensor, atoms: torch.Tensor, s: int) -> tuple[list[int], list[float]]:
    r, idx, coef = x.double().clone(), [], []
    a = atoms.double()
    for _ in range(s):
        corr = a @ r
        i = int(corr.abs().argmax())
        idx.append(i)
        coef.append(float(corr[i]))
        r = r - corr[i] * a[i]
    return idx, coef


def ref_omp(x: torch.Tensor, atoms: torch.Tensor, s: int) -> tuple[list[int], list[float]]:
    x, a = x.double(), atoms.double()
    r, idx, sol = x.clone(), [], torch.zeros(0, dtype=torch.float64)
    for _ in range(s):
        score = (a @ r).abs()
        score[idx] = -1.0
        idx.append(int(score.argmax()))
        sol = torch.linalg.lstsq(a[idx].T, x[:, None]).solution[:, 0]
        r = x - a[idx].T @ sol
    return idx, sol.tolist()


REF = {"mp": ref_mp, "omp": ref_omp}


def unit_rows(w: torch.Tensor) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True)


def random_case(seed: int, b: int, n: int, d: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    atoms = unit_rows(torch.randn(n, d, generator=gen, dtype=torch.float64)).to(dtype)
    x = torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype)
    return x, atoms


def rel_err(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-vector ‖x − x̂‖² / ‖x‖² in float64: [B]."""
    x, x_hat = x.double(), x_hat.double()
    return (x - x_hat).pow(2).sum(-1) / x.pow(2).sum(-1).clamp_min(1e-300)


# --- parity with the reference ---


@pytest.mark.parametrize("method", ["mp", "omp"])
@pytest.mark.parametrize("form", FORMS)
def test_matches_reference(method: str, form: bool) -> None:
    x, atoms = random_case(0, 200, 256, 32, torch.float64)
    s = 6
    idx, coef = pursuit.encode(x, atoms, s, method, gram=form)
    assert idx.dtype == torch.int64 and coef.dtype == torch.float32 and idx.shape == (200, s)
    x_hat = pursuit.decode(idx, coef.double(), atoms)
    for b in range(x.shape[0]):
        ref_idx, ref_coef = REF[method](x[b], atoms, s)
        assert idx[b].tolist() == ref_idx
        ref_hat = torch.tensor(ref_coef, dtype=torch.float64) @ atoms[ref_idx]
        e_fast, e_ref = rel_err(x[b], x_hat[b]), rel_err(x[b], ref_hat)
        assert abs(float(e_fast - e_ref)) <= 1e-5 * float(e_ref) + 1e-12
        torch.testing.assert_close(coef[b].double(), torch.tensor(ref_coef, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_float32_matches_reference_error(method: str) -> None:
    x, atoms = random_case(1, 300, 512, 64)
    s = 8
    idx, coef = pursuit.encode(x, atoms, s, method)
    e_fast = rel_err(x, pursuit.decode(idx, coef, atoms))
    same = 0
    for b in range(x.shape[0]):
        ref_idx, ref_coef = REF[method](x[b], atoms, s)
        if idx[b].tolist() == ref_idx:
            same += 1
            ref_hat = torch.tensor(ref_coef, dtype=torch.float64) @ atoms.double()[ref_idx]
            assert abs(float(e_fast[b] - rel_err(x[b], ref_hat))) <= 1e-5 * float(rel_err(x[b], ref_hat)) + 1e-7
    assert same >= 0.97 * x.shape[0]  # float32 rounding may flip a near-tie, rarely


def test_argmax_picks_lowest_index_on_ties() -> None:
    a = torch.tensor([[0.0, 1.0, -1.0, 1.0], [-2.0, 0.0, 2.0, 0.0]])
    assert pursuit._argmax_abs(a).tolist() == [1, 0]
    atoms = torch.eye(4)
    x = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    for method in ("mp", "omp"):
        idx, coef = pursuit.encode(x, atoms, 2, method)
        assert idx.tolist() == [[1, 2]] and coef.tolist() == [[1.0, 1.0]]


# --- properties ---


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.integers(1, 4), form=st.booleans())
def test_omp_recovers_sparse_combination(seed: int, s: int, form: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    atoms = unit_rows(torch.randn(256, 64, generator=gen, dtype=torch.float64))
    support = torch.randperm(256, generator=gen)[:s]
    c = (torch.rand(s, generator=gen, dtype=torch.float64) + 0.5) * (torch.randint(0, 2, (s,), generator=gen) * 2 - 1)
    x = (c @ atoms[support])[None]
    idx, coef = pursuit.encode(x, atoms, s, "omp", gram=form)
    assert sorted(idx[0].tolist()) == sorted(support.tolist())
    order = {int(j): k for k, j in enumerate(support)}
    got = torch.zeros(s, dtype=torch.float64)
    for j, v in zip(idx[0].tolist(), coef[0].double()):
        got[order[j]] = v
    torch.testing.assert_close(got, c, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.sampled_from([16, 64, 200]), d=st.sampled_from([4, 16, 32]))
def test_residual_never_grows_and_omp_beats_mp(seed: int, n: int, d: int) -> None:
    x, atoms = random_case(seed, 64, n, d)
    errs = {}
    for method in ("mp", "omp"):
        prev = torch.ones(64, dtype=torch.float64)
        for s in range(1, 9):
            e = rel_err(x, pursuit.decode(*pursuit.encode(x, atoms, s, method), atoms))
            assert bool((e <= prev + 1e-5).all()), (method, s)
            prev = e
        errs[method] = prev
    # OMP's greedy path differs from MP's, so per vector it can lose; on average it never does here
    assert float(errs["omp"].mean()) <= float(errs["mp"].mean())


def test_reencoding_a_decoded_code_is_stable() -> None:
    x, atoms = random_case(2, 100, 256, 64)
    # OMP: a decoded code is an exactly sparse vector, so re-encoding finds the same code
    idx, coef = pursuit.encode(x, atoms, 4, "omp")
    x_hat = pursuit.decode(idx, coef, atoms)
    idx2, coef2 = pursuit.encode(x_hat, atoms, 4, "omp")
    assert torch.equal(idx2.sort(1).values, idx.sort(1).values)
    assert float(rel_err(x_hat, pursuit.decode(idx2, coef2, atoms)).max()) < 1e-9
    # MP: exact at S = 1; at S = 4 re-encoding loses far less than the first encoding did
    one = pursuit.decode(*pursuit.encode(x, atoms, 1, "mp"), atoms)
    assert float(rel_err(one, pursuit.decode(*pursuit.encode(one, atoms, 1, "mp"), atoms)).max()) < 1e-9
    idx, coef = pursuit.encode(x, atoms, 4, "mp")
    x_hat = pursuit.decode(idx, coef, atoms)
    x_hat2 = pursuit.decode(*pursuit.encode(x_hat, atoms, 4, "mp"), atoms)
    assert float(rel_err(x_hat, x_hat2).mean()) < 0.2 * float(rel_err(x, x_hat).mean())


@pytest.mark.parametrize("method", ["mp", "omp"])
@pytest.mark.parametrize("form", FORMS)
def test_chunking_is_identical(method: str, form: bool) -> None:
    x, atoms = random_case(3, 300, 128, 32)
    one = pursuit.encode(x, atoms, 5, method, chunk=300, gram=form)
    for chunk in (1, 7, 64):
        many = pursuit.encode(x, atoms, 5, method, chunk=chunk, gram=form)
        assert torch.equal(one[0], many[0])
        torch.testing.assert_close(one[1], many[1], rtol=1e-6, atol=1e-6)


def test_gram_and_direct_forms_agree() -> None:
    x, atoms = random_case(4, 200, 512, 64)
    for method in ("mp", "omp"):
        i1, c1 = pursuit.encode(x, atoms, 8, method, gram=True)
        i2, c2 = pursuit.encode(x, atoms, 8, method, gram=False)
        i3, c3 = pursuit.encode(x, atoms, 8, method, gram=pursuit.gram(atoms))
        assert (i1 == i2).float().mean() > 0.99 and torch.equal(i1, i3)
        e1, e2 = rel_err(x, pursuit.decode(i1, c1, atoms)), rel_err(x, pursuit.decode(i2, c2, atoms))
        torch.testing.assert_close(e1.mean(), e2.mean(), rtol=1e-4, atol=0)


@pytest.fixture
def native_bf16(monkeypatch):
    """The fast path whatever this CPU has: an emulated bf16 GEMM is slower, not different."""
    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: True)


@pytest.fixture
def refined(monkeypatch) -> list:
    """Counts the fast direct form's picks (pursuit._refine, which still runs): the bf16 path was taken."""
    calls: list = []
    real = pursuit._refine

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pursuit, "_refine", counting)
    return calls


def test_fast_picks_settle_near_ties_exactly(native_bf16, refined) -> None:
    """Two atoms whose correlations with x differ by less than bf16 resolves: bf16 alone picks wrongly on some
    vectors, the fast path (bf16 screens two, float32 decides) picks what the exact path picks on all of them."""
    g = torch.Generator().manual_seed(11)
    atoms = F.normalize(torch.randn(512, 64, generator=g), dim=1)
    pairs = torch.randint(512, (400, 2), generator=g)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    x = atoms[pairs[:, 0]] + (1 - 1e-3) * atoms[pairs[:, 1]]
    exact = pursuit.encode(x, atoms, 1, "omp")[0][:, 0]
    bf16_alone = (x.bfloat16() @ atoms.bfloat16().T).float().abs().argmax(1)
    assert (bf16_alone != exact).any()
    for method in ("mp", "omp"):
        assert torch.equal(pursuit.encode(x, atoms, 1, method, fast=True)[0][:, 0], exact)
    assert refined
    del refined[:]
    alone = pursuit.encode(x, atoms, 1, "omp", fast=True, refine=False)[0][:, 0]  # train-dict's settle: the bf16 argmax
    assert not refined and not torch.equal(alone, exact)


def chosen_atoms_coefficients(x: torch.Tensor, atoms: torch.Tensor, idx: torch.Tensor, method: str) -> torch.Tensor:
    """float64 coefficients of the atoms in idx [B, S]: least squares (OMP) or matching pursuit's along them (MP)."""
    a = atoms.double()[idx]  # [B, S, D]
    if method == "omp":
        return torch.linalg.lstsq(a.transpose(1, 2), x.double()[:, :, None]).solution[:, :, 0]
    r, out = x.double().clone(), []
    for k in range(idx.shape[1]):
        c = (r * a[:, k]).sum(1)
        out.append(c)
        r = r - c[:, None] * a[:, k]
    return torch.stack(out, 1)


@pytest.mark.parametrize("method", ["mp", "omp"])
@pytest.mark.parametrize("form", FORMS)
def test_fast_correlations_choose_about_as_well_with_exact_coefficients(native_bf16, refined, method: str, form: bool) -> None:
    x, atoms = random_case(6, 300, 2048, 64)
    s = 8
    idx, coef = pursuit.encode(x, atoms, s, method, gram=form, fast=True)
    exact_idx, exact_coef = pursuit.encode(x, atoms, s, method, gram=form)
    if form:  # the Gram form: bf16 a0, exact updates, no refined pick: some near-ties go the other way
        assert not torch.equal(idx, exact_idx) and not refined
    else:  # the direct form: bf16 screens, float32 picks
        assert refined and len(refined) % s == 0  # one refined pick per step and chunk
    assert (idx == exact_idx).all(1).float().mean() > 0.5
    torch.testing.assert_close(coef.double(), chosen_atoms_coefficients(x, atoms, idx, method), rtol=1e-4, atol=1e-5)
    e_fast = float(rel_err(x, pursuit.decode(idx, coef, atoms)).mean())
    e_exact = float(rel_err(x, pursuit.decode(exact_idx, exact_coef, atoms)).mean())
    assert abs(e_fast - e_exact) <= 0.01 * e_exact


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_fast_codes_do_not_depend_on_the_batch(native_bf16, refined, method: str) -> None:
    """compress codes a whole cache, the live cache a token's heads at a time: with bf16 correlations the
    same vector must get the same code either way (the rounding is elementwise), as on the exact path."""
    x, atoms = random_case(8, 600, 1024, 64)
    whole = pursuit.encode(x, atoms, 8, method, fast=True)
    assert refined  # the bf16 path was taken
    for step in (1, 3, 257):
        parts = [pursuit.encode(x[i : i + step], atoms, 8, method, fast=True) for i in range(0, x.shape[0], step)]
        assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
        torch.testing.assert_close(whole[1], torch.cat([p[1] for p in parts]), rtol=1e-5, atol=1e-6)


def test_adaptive_fast_codes_keep_exact_coefficients_and_the_error(native_bf16, refined) -> None:
    x, atoms = random_case(9, 400, 2048, 64)
    xg = x.view(2, 200, 64)
    ag = torch.stack([atoms, atoms.flip(0)])
    fast = pursuit.encode_groups_adaptive(xg, ag, 12, 2 * 200 * 6, "omp", fast=True)
    assert refined and len(refined) % 12 == 0  # the bf16 path (one refined pick per step and chunk)
    exact = pursuit.encode_groups_adaptive(xg, ag, 12, 2 * 200 * 6, "omp")
    assert (fast[0] == exact[0]).all(-1).float().mean() > 0.9
    assert int(fast[2].sum()) <= 2 * 200 * 6
    for g in range(2):  # each vector's coefficients: least squares on its first counts[t] atoms
        for t in range(0, 200, 37):
            k = int(fast[2][g, t])
            if k:
                ls = torch.linalg.lstsq(ag[g].double()[fast[0][g, t, :k]].T, xg[g, t].double()[:, None]).solution[:, 0]
                torch.testing.assert_close(fast[1][g, t, :k].double(), ls, rtol=1e-4, atol=1e-5)
    err = [float((xg - pursuit.decode_groups(i, c, ag)).pow(2).sum() / xg.pow(2).sum()) for i, c, _ in (fast, exact)]
    assert abs(err[0] - err[1]) <= 0.01 * err[1]


def test_fast_is_the_exact_path_without_native_bf16(monkeypatch) -> None:
    x, atoms = random_case(7, 100, 1024, 64)
    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: False)
    assert not pursuit.fast_correlations(torch.float32, "cpu")
    for method in ("mp", "omp"):
        fast, exact = pursuit.encode(x, atoms, 6, method, fast=True), pursuit.encode(x, atoms, 6, method)
        assert all(torch.equal(f, e) for f, e in zip(fast, exact))
    monkeypatch.setattr(pursuit, "_native_bf16_cpu", lambda: True)
    assert pursuit.fast_correlations(torch.float32, "cpu") and not pursuit.fast_correlations(torch.float64, "cpu")
    fast, exact = pursuit.encode(x.double(), atoms.double(), 6, "omp", fast=True), pursuit.encode(x.double(), atoms.double(), 6, "omp")
    assert all(torch.equal(f, e) for f, e in zip(fast, exact))  # float64 work never takes it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype: torch.dtype) -> None:
    x, atoms = random_case(5, 100, 256, 64)
    for method in ("mp", "omp"):
        idx, coef = pursuit.encode(x.to(dtype), atoms.to(dtype), 4, method)
        assert coef.dtype == torch.float32 and torch.isfinite(coef).all()
        i32, c32 = pursuit.encode(x.to(dtype).float(), atoms.to(dtype).float(), 4, method)
        assert torch.equal(idx, i32)
        torch.testing.assert_close(coef, c32)
        assert pursuit.decode(idx, coef, atoms.to(dtype)).dtype == dtype


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_zero_vectors_and_sparsity_beyond_dim(method: str) -> None:
    x, atoms = random_case(6, 20, 40, 8)
    x[3] = 0
    idx, coef = pursuit.encode(x, atoms, 12, method)  # S = 12 > D = 8
    assert torch.isfinite(coef).all()
    assert (coef[3] == 0).all()
    e = rel_err(x, pursuit.decode(idx, coef, atoms))
    if method == "omp":
        assert all(len(set(row)) == 12 for row in idx.tolist())  # never the same atom twice
        assert float(e[torch.arange(20) != 3].max()) < 1e-8  # 8 independent atoms span R^8


def test_bad_arguments() -> None:
    x, atoms = random_case(7, 4, 8, 4)
    with pytest.raises(ValueError, match="method"):
        pursuit.encode(x, atoms, 2, "lasso")
    with pytest.raises(ValueError, match="sparsity"):
        pursuit.encode(x, atoms, 9, "omp")
    assert pursuit.encode(x[:0], atoms, 2)[0].shape == (0, 2)


# --- split and grouped forms ---


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_split_matches_loop_over_chunks(method: str) -> None:
    gen = torch.Generator().manual_seed(8)
    c, n, dc = 2, 128, 32
    atoms = unit_rows(torch.randn(c, n, dc, generator=gen))
    x = torch.randn(150, c * dc, generator=gen)
    idx, coef = pursuit.encode_split(x, atoms, 4, method)
    assert idx.shape == coef.shape == (150, c, 4)
    for k in range(c):
        i_k, c_k = pursuit.encode(x[:, k * dc : (k + 1) * dc], atoms[k], 4, method)
        assert torch.equal(idx[:, k], i_k)
        torch.testing.assert_close(coef[:, k], c_k)
    x_hat = pursuit.decode_split(idx, coef, atoms)
    loop = torch.cat([pursuit.decode(idx[:, k], coef[:, k], atoms[k]) for k in range(c)], dim=1)
    torch.testing.assert_close(x_hat, loop)


@pytest.mark.parametrize("method", ["mp", "omp"])
def test_groups_match_loop_over_groups(method: str) -> None:
    gen = torch.Generator().manual_seed(9)
    g, n, d = 3, 128, 32
    atoms = unit_rows(torch.randn(g, n, d, generator=gen))
    x = torch.randn(g, 90, d, generator=gen)
    idx, coef = pursuit.encode_groups(x, atoms, 5, method, chunk=100)
    x_hat = pursuit.decode_groups(idx, coef, atoms)
    for k in range(g):
        i_k, c_k = pursuit.encode(x[k], atoms[k], 5, method)
        assert torch.equal(idx[k], i_k)
        torch.testing.assert_close(coef[k], c_k)
        torch.testing.assert_close(x_hat[k], pursuit.decode(i_k, c_k, atoms[k]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["mp", "omp"])
def test_cuda_matches_cpu(method: str) -> None:
    x, atoms = random_case(10, 500, 512, 64)
    i_cpu, c_cpu = pursuit.encode(x, atoms, 8, method)
    i_gpu, c_gpu = pursuit.encode(x.cuda(), atoms.cuda(), 8, method)
    assert i_gpu.device.type == "cuda" and c_gpu.dtype == torch.float32
    assert (i_gpu.cpu() == i_cpu).float().mean() > 0.98  # TF32/rounding may flip a near-tie
    e_cpu = rel_err(x, pursuit.decode(i_cpu, c_cpu, atoms))
    e_gpu = rel_err(x, pursuit.decode(i_gpu, c_gpu, atoms.cuda()).cpu())
    torch.testing.assert_close(e_gpu.mean(), e_cpu.mean(), rtol=1e-3, atol=0)


def test_adaptive_chunking_is_identical() -> None:
    """The work buffers are reused from chunk to chunk: the kept Cholesky factors must not carry a later chunk's values."""
    x, atoms = random_case(11, 300, 128, 32)
    one = pursuit.encode_groups_adaptive(x[None], atoms[None], 8, 300 * 4, "omp", chunk=300)
    for chunk in (1, 7, 64):
        many = pursuit.encode_groups_adaptive(x[None], atoms[None], 8, 300 * 4, "omp", chunk=chunk)
        assert torch.equal(one[0], many[0]) and torch.equal(one[2], many[2])
        torch.testing.assert_close(one[1], many[1], rtol=1e-5, atol=1e-6)
