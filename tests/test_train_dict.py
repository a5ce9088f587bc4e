"""`csrtool train-dict` and csrtool.train: shapes, metadata, resume, CLI end to end and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from csrtool.formats.acts import ActsWriter
from csrtool.cli import app
from csrtool.formats.dicts import load_dicts
from csrtool.engine.neuraldict import TrainConfig
from csrtool.train import default_value_split, partial_dir, train_dicts

runner = CliRunner()
L, H, D, T = 2, 2, 16, 400
FAST = dict(atoms=16, sparsity=2, epochs=2, batch_size=128, kmeans_iters=2, scope="head")


def make_acts(path: Path, seed: int = 0, D: int = D) -> Path:
    """A tiny activation dir: per layer/kind/head, 2-sparse mixes of 24 random atoms plus noise."""
    g = torch.Generator().manual_seed(seed)
    w = ActsWriter(path, {"model": "tiny-random", "key_space": "post-rope", "num_kv_heads": H, "head_dim": D,
                          "layers": list(range(L)), "rope": {"inv_freq": [1.0] * (D // 2), "scaling": 1.0}},
                   shard_tokens=250)
    bases = {(layer, kind): torch.nn.functional.normalize(torch.randn(H, 24, D, generator=g), dim=2)
             for layer in range(L) for kind in "kv"}
    for _ in range(T // 100):
        block = {}
        for (layer, kind), base in bases.items():
            idx = torch.randint(24, (100, H, 2), generator=g)
            coef = torch.randn(100, H, 2, generator=g)
            atoms = base[torch.arange(H)[None, :, None], idx]  # [100, H, 2, D]
            block[(layer, kind)] = (coef[..., None] * atoms).sum(2) + 0.02 * torch.randn(100, H, D, generator=g)
        w.add(block)
    w.close()
    return path


@pytest.fixture(scope="module")
def acts(tmp_path_factory) -> Path:
    return make_acts(tmp_path_factory.mktemp("acts") / "acts")


def test_train_writes_all_dictionaries(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    cfg = TrainConfig(**FAST, value_split=2)
    report = train_dicts(acts, out, cfg)
    ds = load_dicts(out)
    assert sorted(ds.atoms) == ["layer.0.k", "layer.0.v", "layer.1.k", "layer.1.v"]
    assert ds.atoms["layer.0.k"].shape == (H, 1, 16, D)
    assert ds.atoms["layer.1.v"].shape == (H, 2, 16, D // 2)
    for t in ds.atoms.values():
        torch.testing.assert_close(t.norm(dim=-1), torch.ones(t.shape[:-1]), atol=1e-5, rtol=0)
    assert ds.config == cfg.to_dict()
    assert ds.source["model"] == "tiny-random" and ds.source["num_kv_heads"] == H and ds.source["head_dim"] == D
    assert ds.source["tokens"] == T and "rope" in ds.source and len(ds.source["acts_fingerprint"]) == 64
    err = ds.errors["layer.1.v"]
    assert len(err["val_rel_err"]) == H and len(err["val_rel_err"][0]) == 2
    assert 0 < err["mean_val_rel_err"] < 1
    assert report["trained"] == L * H * 3 and report["resumed"] == 0
    assert not partial_dir(out).exists()


def test_means_are_the_training_means_and_are_subtracted(acts, tmp_path):
    from csrtool.formats.acts import ActsReader
    from csrtool import codec

    out = tmp_path / "c.safetensors"
    train_dicts(acts, out, TrainConfig(**FAST, value_split=2))
    ds = load_dicts(out)
    x = ActsReader(acts).load(1, "v")  # [T, H, D]
    assert sorted(ds.means) == ["layer.0.k", "layer.0.v", "layer.1.k", "layer.1.v"]
    # the split is random, so the mean of the training vectors is close to, not equal to, the full mean
    torch.testing.assert_close(ds.mean(1, "v"), x.mean(0), atol=0.05, rtol=0)
    assert ds.mean(1, "v").shape == (H, D) and float(ds.mean(1, "v").abs().sum()) > 0
    # coding x minus the mean: codec.roundtrip with the mean is exactly that, shifted back
    xb = x.permute(1, 0, 2)[None]
    want = codec.roundtrip(xb - ds.mean(1, "v")[None, :, None], ds.get(1, "v"), 2) + ds.mean(1, "v")[None, :, None]
    torch.testing.assert_close(codec.roundtrip(xb, ds.get(1, "v"), 2, mean=ds.mean(1, "v")), want, atol=1e-5, rtol=0)
    plain = tmp_path / "p.safetensors"
    train_dicts(acts, plain, TrainConfig(**FAST, center=False))
    assert load_dicts(plain).means == {} and load_dicts(plain).config["center"] is False


def test_layer_scope_and_layer_selection(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    train_dicts(acts, out, TrainConfig(**{**FAST, "scope": "layer"}), layers=[1])
    ds = load_dicts(out)
    assert ds.layers == [1] and ds.atoms["layer.1.k"].shape == (1, 1, 16, D)


def test_resume_skips_finished_and_gives_identical_output(acts, tmp_path):
    cfg = TrainConfig(**FAST)
    full = tmp_path / "full.safetensors"
    train_dicts(acts, full, cfg)

    out = tmp_path / "resumed.safetensors"
    trained = []

    def crash_after_three(event, info):
        if event == "done" and not info["resumed"]:
            trained.append(info["name"])
            if len(trained) == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dicts(acts, out, cfg, progress=crash_after_three)
    assert not out.exists() and partial_dir(out).is_dir()

    events = []
    report = train_dicts(acts, out, cfg, progress=lambda e, i: events.append((e, i)))
    assert events[0] == ("start", {"total": L * 2 * H, "resumed": 3})
    redone = [i["name"] for e, i in events if e == "done" and not i["resumed"]]
    assert len(redone) == L * 2 * H - 3 and not set(redone) & set(trained)
    assert report["resumed"] == 3
    a, b = load_dicts(out), load_dicts(full)  # same atoms and means, bit for bit, and the same metadata
    assert a.fingerprint == b.fingerprint and all(torch.equal(a.atoms[k], b.atoms[k]) for k in b.atoms)
    assert sorted(a.means) == sorted(b.means) and all(torch.equal(a.means[k], b.means[k]) for k in b.means)
    assert (a.config, a.source, a.errors) == (b.config, b.source, b.errors)
    assert not partial_dir(out).exists()


def test_resume_ignores_side_files_of_another_config(acts, tmp_path):
    out = tmp_path / "d.safetensors"

    def crash(event, info):
        if event == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dicts(acts, out, TrainConfig(**FAST), progress=crash)
    events = []
    train_dicts(acts, out, TrainConfig(**{**FAST, "seed": 1}), layers=[0], progress=lambda e, i: events.append((e, i)))
    assert events[0] == ("start", {"total": 2 * H, "resumed": 0})


def test_cli_end_to_end(acts, tmp_path):
    out, rep = tmp_path / "d.safetensors", tmp_path / "r.json"
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "16", "--sparsity", "2", "--epochs", "1", "--scope", "head",
                              "--value-split", "2", "--json", str(rep)])
    assert res.exit_code == 0, res.output
    assert "held-out relative error" in res.stdout and "trained 12, resumed 0" in res.stdout
    data = json.loads(rep.read_text())
    assert [r["layer"] for r in data["layers"]] == [0, 1]
    assert all(0 < r["k_val_rel_err"] < 1 and 0 < r["v_val_rel_err"] < 1 for r in data["layers"])
    assert data["config"]["value_split"] == 2 and data["trained"] == 12
    assert load_dicts(out).atoms["layer.0.v"].shape == (H, 2, 16, D // 2)


def test_default_value_split_is_chunks_of_128_channels():
    assert [default_value_split(d) for d in (16, 64, 128, 192, 256, 384, 512)] == [1, 1, 1, 1, 2, 3, 4]


@pytest.mark.parametrize("head_dim, flags, chunks", [(256, [], 2), (256, ["--value-split", "1"], 1), (D, [], 1)])
def test_cli_value_split_default_follows_head_dim(tmp_path, head_dim, flags, chunks):
    acts = make_acts(tmp_path / "acts", D=head_dim)
    out, rep = tmp_path / "d.safetensors", tmp_path / "r.json"
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "16", "--sparsity", "2", "--epochs", "0",
                              "--scope", "head", "--json", str(rep), *flags])
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["config"]["value_split"] == chunks
    assert load_dicts(out).atoms["layer.1.v"].shape == (H, chunks, 16, head_dim // chunks)
    assert load_dicts(out).atoms["layer.1.k"].shape == (H, 1, 16, head_dim)
    assert (f"values: {chunks} chunks of {head_dim // chunks} channels" in res.stdout) == (chunks > 1)


@pytest.mark.parametrize("args, message", [
    (["{missing}", "-o", "{out}"], "activation directory"),
    (["{acts}", "-o", "{out}", "--atoms", "0"], "atoms must be a positive integer, got 0"),
    (["{acts}", "-o", "{out}", "--scope", "model"], "scope must be one of head, layer"),
    (["{acts}", "-o", "{out}", "--value-split", "3"], "value_split 3 does not divide head_dim 16"),
    (["{acts}", "-o", "{out}", "--layers", "5"], "out of range"),
    (["{acts}", "-o", "{existing}"], "already exists: pass --force"),
    (["{acts}", "-o", "{nodir}"], "does not exist: create it first"),
])
def test_cli_bad_input(acts, tmp_path, args, message):
    existing = tmp_path / "old.safetensors"
    existing.write_bytes(b"x")
    paths = {"missing": tmp_path / "nope", "out": tmp_path / "d.safetensors", "acts": acts, "existing": existing,
             "nodir": tmp_path / "no" / "d.safetensors"}
    res = runner.invoke(app, ["train-dict", *(a.format(**paths) for a in args)])
    assert res.exit_code == 1, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "d.safetensors").exists()


def test_cli_notes_fewer_vectors_than_atoms(acts, tmp_path):
    # 400 tokens per head, 10% held out: 360 training vectors per per-head dictionary
    out = tmp_path / "d.safetensors"
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "512", "--sparsity", "2", "--epochs", "0", "--scope", "head",
                              "--layers", "0", "--no-calibrate"])
    assert res.exit_code == 0, res.output
    assert "each dictionary trains on 360 vectors, fewer than its 512 atoms" in res.stderr
    assert "every index costs 9 bits" in res.stderr and "--atoms 128" in res.stderr
    assert out.exists()
    res = runner.invoke(app, ["train-dict", str(acts), "-o", str(out), "--atoms", "256", "--sparsity", "2", "--epochs", "0", "--scope", "layer",
                              "--layers", "0", "--no-calibrate", "--force"])
    assert res.exit_code == 0, res.output
    assert "fewer than its" not in res.stderr  # layer scope: 720 vectors for 256 atoms
