"""Real 2-process torchrun jobs (gloo, CPU): collect, train-dict sharded and data parallel, a failing rank.

Each job is `python -m torch.distributed.run --standalone --nproc-per-node 2 -m csrtool ...` on a
tiny random Llama, one thread per rank; the one-process references run the same CLI in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from csrtool.cli import app
from csrtool.formats.acts import ActsReader
from csrtool.formats.dicts import load_dicts

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--atoms", "16", "--sparsity", "2", "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--no-cross-layer"]  # one process vs ranks
runner = CliRunner()


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CSRTOOL_DIST_TIMEOUT": "120"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "csrtool", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


def cli(*args: str) -> None:
    res = runner.invoke(app, list(args))
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def collected(tiny_llama_dir, tmp_path_factory):
    """The same text collected by 2 ranks and by one process."""
    tmp = tmp_path_factory.mktemp("dist")
    text = tmp / "text.txt"
    words = ["alpha", "beta", "gamma", "delta", "cache", "token", "layer", "head", "vector", "sparse"]
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(len(words), (3000,), generator=g)))
    common = ["--model", str(tiny_llama_dir), "--text", str(text), "--max-tokens", "512", "--seq-len", "64", "--device", "cpu"]
    res = torchrun("collect", "-o", str(tmp / "acts2"), *common)
    assert res.returncode == 0, res.stderr[-3000:]
    cli("collect", "-o", str(tmp / "acts1"), *common)
    return tmp


def test_collect_two_ranks_lists_every_shard_and_the_same_vectors(collected):
    two, one = ActsReader(collected / "acts2"), ActsReader(collected / "acts1")
    assert sorted(two.manifest["shards"]) == ["shard-r0-00000.safetensors", "shard-r1-00000.safetensors"]
    assert all((two.dir / s).is_file() for s in two.manifest["shards"])
    assert two.tokens == one.tokens == 512 and two.manifest["probe_ids"] == one.manifest["probe_ids"]
    # rank 0 ran windows 0, 2, 4, 6 and rank 1 windows 1, 3, 5, 7 (64 tokens each)
    x2, x1 = two.load(1, "v"), one.load(1, "v")  # [T, H, D]
    order = [w for r in (0, 1) for w in range(r, 8, 2)]
    torch.testing.assert_close(x2, torch.cat([x1[w * 64 : (w + 1) * 64] for w in order]), rtol=0, atol=0)


def test_sharded_training_and_calibration_match_one_process_byte_for_byte(collected):
    out2, out1 = collected / "d2.safetensors", collected / "d1.safetensors"
    res = torchrun("train-dict", str(collected / "acts2"), "-o", str(out2), *TRAIN, "--dist", "shard")
    assert res.returncode == 0, res.stderr[-3000:]
    cli("train-dict", str(collected / "acts2"), "-o", str(out1), *TRAIN)
    ds = load_dicts(out2)
    assert set(ds.sensitivity["kl"]) == {f"layer.{l}.{k}" for l in (0, 1) for k in "kv"}  # every rank's layers merged
    assert out2.read_bytes() == out1.read_bytes()


def test_sharded_training_with_the_token_predictor_matches_one_process(collected):
    """Each rank fits the maps of its layers from the ids of every shard; the file is the one-process one."""
    out2, out1 = collected / "t2.safetensors", collected / "t1.safetensors"
    res = torchrun("train-dict", str(collected / "acts2"), "-o", str(out2), *TRAIN, "--predictor", "--dist", "shard")
    assert res.returncode == 0, res.stderr[-3000:]
    cli("train-dict", str(collected / "acts2"), "-o", str(out1), *TRAIN, "--predictor")
    assert load_dicts(out2).predicted and out2.read_bytes() == out1.read_bytes()
    res = torchrun("train-dict", str(collected / "acts2"), "-o", str(collected / "t3.safetensors"), *TRAIN, "--predictor", "--dist", "data")
    assert res.returncode != 0 and "use --dist shard" in res.stderr
    assert not (collected / "t3.safetensors").exists()


def test_data_parallel_training_matches_one_process_within_tolerance(collected):
    out2, out1 = collected / "p2.safetensors", collected / "p1.safetensors"
    opts = [*TRAIN, "--scope", "layer", "--epochs", "3", "--no-calibrate"]
    res = torchrun("train-dict", str(collected / "acts2"), "-o", str(out2), *opts, "--dist", "data")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "token predictor: off (--dist data" in res.stdout  # the default predictor cannot fit partial rows: left out
    cli("train-dict", str(collected / "acts2"), "-o", str(out1), *opts, "--no-predictor")
    two, one = load_dicts(out2), load_dicts(out1)
    assert not two.predicted and not one.predicted
    for name in one.atoms:
        assert two.atoms[name].shape == one.atoms[name].shape == (1, 1, 16, 8)
        e2, e1 = two.errors[name], one.errors[name]
        # every rank's rows took part (90% of 512 tokens x 2 heads) and the global batch was --batch-size
        assert two.source["tokens"] == 512 and e2["epochs"] == e1["epochs"] == [[3]]
        # different splits and seeds per rank: on this tiny model the held-out error varies by up to
        # ~2x across one-process seeds alone (6 seeds, batched k-means++ seeding: keys 0.042-0.102,
        # values 0.045-0.084), so the two runs are compared with that spread; the all-reduced mean
        # below is the exact check of the data-parallel reduction
        tol = 0.6
        assert e2["mean_val_rel_err"] == pytest.approx(e1["mean_val_rel_err"], rel=tol)
        assert e2["mean_train_rel_err"] == pytest.approx(e1["mean_train_rel_err"], rel=tol)
        layer, kind = int(name.split(".")[1]), name.split(".")[2]
        torch.testing.assert_close(two.mean(layer, kind), one.mean(layer, kind), atol=0.05, rtol=0.05)  # the all-reduced mean


def test_a_failing_rank_fails_the_job_with_a_clear_error_and_writes_nothing(collected):
    broken = collected / "broken"
    shutil.copytree(collected / "acts2", broken)
    (broken / "shard-r1-00000.safetensors").write_bytes(b"not a safetensors file")  # only rank 1 reads it in --dist data
    out = collected / "never.safetensors"
    res = torchrun("train-dict", str(broken), "-o", str(out), *TRAIN, "--scope", "layer", "--no-calibrate", "--dist", "data")
    assert res.returncode != 0
    assert "reading activations failed on rank 1 of 2" in res.stderr and "shard-r1-00000.safetensors is unreadable" in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1  # one line per rank, the same on both
    assert "/csrtool/" not in res.stderr  # no csrtool traceback (torchrun prints its own summary)
    assert not out.exists() and not list(collected.glob("never*"))
