"""Issue 14: no data loss, reproducible training, refusals before work, clean outputs, one-line errors.

Each test reproduces one failure a fuzzing pass found (the item number is in the name)."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from csrtool.cli import app
from csrtool.engine.neuraldict import TrainConfig, train_dictionary
from csrtool.errors import CsrError
from csrtool.formats import io
from csrtool.formats.dicts import load_dicts
from csrtool.train import MARKER, partial_dir, train_dicts

from test_compress_cli import files  # noqa: F401 (fixture)
from test_train_dict import FAST, acts  # noqa: F401 (fixture)

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def one_line(res, code: int = 1) -> str:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


def interrupted(acts: Path, out: Path, cfg: TrainConfig, after: int) -> list[str]:
    """Run train_dicts until `after` dictionaries are done, then Ctrl-C; the names done."""
    names: list[str] = []

    def crash(event, info):
        if event == "done":
            names.append(info["name"])
            if len(names) == after:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_dicts(acts, out, cfg, layers=[0], progress=crash)
    return names


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------- 14.1 and 14.14: the side directory


def test_1_foreign_partial_directory_is_refused_and_kept(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    part = partial_dir(out)
    part.mkdir()
    (part / "keep.txt").write_text("keep")
    res = run("train-dict", acts, "-o", out, "--atoms", "16", "--sparsity", "2", "--epochs", "1", "--no-calibrate")
    assert "was not created by csrtool train-dict" in one_line(res)
    assert (part / "keep.txt").read_text() == "keep" and not out.exists()
    # a file named like our state is not enough either: only the marker makes it ours
    (part / "state.json").write_text("{}")
    with pytest.raises(CsrError, match="left alone"):
        train_dicts(acts, out, TrainConfig(**FAST))
    assert sorted(p.name for p in part.iterdir()) == ["keep.txt", "state.json"]


def test_1_empty_directory_is_adopted_and_our_own_is_removed(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    partial_dir(out).mkdir()
    train_dicts(acts, out, TrainConfig(**FAST), layers=[0])
    assert out.is_file() and not partial_dir(out).exists()


def test_1_interrupted_run_leaves_a_marked_directory_that_resumes(acts, tmp_path):
    out = tmp_path / "d.safetensors"
    interrupted(acts, out, TrainConfig(**FAST), after=1)
    assert (partial_dir(out) / MARKER).is_file()
    report = train_dicts(acts, out, TrainConfig(**FAST), layers=[0])
    assert report["resumed"] == 1 and not partial_dir(out).exists()


def test_14_truncated_partial_entry_is_retrained(acts, tmp_path):
    cfg = TrainConfig(**FAST)
    straight = tmp_path / "straight.safetensors"
    train_dicts(acts, straight, cfg, layers=[0])
    out = tmp_path / "d.safetensors"
    names = interrupted(acts, out, cfg, after=2)
    unit = partial_dir(out) / f"{names[0]}.safetensors"
    unit.write_bytes(unit.read_bytes()[:50])  # truncated, as by a full disk or a crash
    report = train_dicts(acts, out, cfg, layers=[0])
    assert (report["trained"], report["resumed"]) == (2 * 2 - 1, 1)
    assert load_dicts(out).fingerprint == load_dicts(straight).fingerprint


# ---------------------------------------------------------------- 14.7: reproducible training


def test_7_training_with_two_threads_is_reproducible():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(2400, 64, generator=torch.Generator().manual_seed(0))
        cfg = TrainConfig(atoms=64, sparsity=4, epochs=2, max_vectors=2048, kmeans_iters=1)
        runs = {hashlib.sha256(train_dictionary(x, cfg, seed=1)[0].numpy().tobytes()).hexdigest() for _ in range(3)}
        torch.set_num_threads(1)
        one = hashlib.sha256(train_dictionary(x, cfg, seed=1)[0].numpy().tobytes()).hexdigest()
    finally:
        torch.set_num_threads(before)
    assert runs == {one}  # same atoms, byte for byte, every time and with one thread


# ---------------------------------------------------------------- 14.12: out-of-range options


def test_12_compress_sparsity_beyond_atoms_or_channels(files):
    d, dicts, cache_path = files
    for s in ("5000", "4096", "17"):
        line = one_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--sparsity", s))
        assert f"--sparsity {s} for keys is more than" in line
    assert not (d / "c.csr").exists()


@pytest.mark.parametrize("args, message", [
    (["--atoms", "1000000000"], "--atoms 1000000000 needs about"),
    (["--sparsity", "100", "--atoms", "1024"], "sparsity 100 is more atoms per vector than the 16 channels"),
    (["--sparsity", "100", "--atoms", "16"], "sparsity must be between 1 and atoms (16)"),
])
def test_12_train_dict_impossible_options(acts, tmp_path, args, message):
    out = tmp_path / "d.safetensors"
    assert message in one_line(run("train-dict", acts, "-o", out, "--no-calibrate", *args))
    assert leftovers(tmp_path, set()) == []


# ---------------------------------------------------------------- 14.13: outputs checked first


@pytest.mark.parametrize("json_arg, message", [
    ("nodir/r.json", "does not exist: create it first"),
    ("adir", "is a directory: give a file name"),
])
def test_13_json_destination_checked_before_the_output_is_written(files, json_arg, message):
    d, dicts, cache_path = files
    (d / "adir").mkdir()
    line = one_line(run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--json", d / json_arg))
    assert message in line and not (d / "c.csr").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_13_unwritable_directory(files):
    d, dicts, cache_path = files
    ro = d / "ro"
    ro.mkdir(mode=0o500)
    assert "is not writable" in one_line(run("compress", cache_path, "--dicts", dicts, "-o", ro / "c.csr"))


def test_13_file_size_limit_is_a_clean_error_and_leaves_nothing(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(CsrError, match=r"cannot write .*big.bin: File too large .*nothing was written"):
            io.atomic_write_bytes(tmp_path / "big.bin", b"x" * (1 << 18))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert leftovers(tmp_path, set()) == []


# ---------------------------------------------------------------- 14.15: temporaries


def test_15_sigterm_cleans_up_like_ctrl_c(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from csrtool.cli.common import guarded, handle_sigterm
        from csrtool.formats.io import atomic_path
        handle_sigterm()

        @guarded
        def work():
            with atomic_path({str(tmp_path / 'out.bin')!r}) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(b"x" * 1000)
                print("ready", flush=True)
                time.sleep(60)
        try:
            work()
        except SystemExit as e:
            sys.exit(e.code)
        except BaseException as e:  # typer.Exit
            sys.exit(getattr(e, "exit_code", 99))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert stderr.strip() == "terminated: nothing was written under the output name"
    assert leftovers(tmp_path, set()) == []


def test_15_next_run_removes_only_its_own_stale_temporaries(files):
    d, dicts, cache_path = files
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = [d / f".c.csr.csrtmp-{dead}-abcd1234.tmp", d / f".c.csr.csrtmp-{dead}-abcd1234.scratch"]
    live = d / f".c.csr.csrtmp-{os.getpid()}-abcd1234.tmp"  # a concurrent run's: kept
    other = [d / ".c.csr.abcd1234.tmp", d / f".x.csr.csrtmp-{dead}-abcd1234.tmp"]  # not ours, or another output's
    for p in (*stale, live, *other):
        p.write_bytes(b"x")
    res = run("compress", cache_path, "--dicts", dicts, "-o", d / "c.csr", "--sparsity", "2")
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in stale) and live.exists() and all(p.exists() for p in other)


def test_15_no_temporary_left_after_a_failed_write(tmp_path):
    with pytest.raises(RuntimeError):
        with io.atomic_path(tmp_path / "o.bin") as tmp:
            Path(tmp).write_bytes(b"partial")
            raise RuntimeError("boom")
    assert leftovers(tmp_path, set()) == []
    with io.scratch_path(tmp_path / "o.bin") as scratch:
        Path(scratch).write_bytes(b"scratch")
    assert leftovers(tmp_path, set()) == []


# ---------------------------------------------------------------- 14.17: messages


def test_17_directory_where_a_file_is_expected(files):
    d, dicts, cache_path = files
    (d / "adir").mkdir()
    line = one_line(run("compress", d / "adir", "--dicts", dicts, "-o", d / "c.csr"))
    assert line == f"error: cache file {d / 'adir'} is a directory, not a file: save one with csrtool cache"
    assert "is a directory, not a file" in one_line(run("compress", cache_path, "--dicts", d / "adir", "-o", d / "c.csr"))
    assert "is a directory, not a file" in one_line(run("inspect", d / "adir"))


@pytest.mark.parametrize("args", [
    ["compress", "x", "--bits", "abc", "-d", "y", "-o", "z"],
    ["compress", "x", "--no-such-option"],
    ["train-dict", "x", "--atoms", "many", "-o", "y"],
    ["no-such-command"],
    ["--no-such-option"],
])
def test_17_usage_errors_are_one_line_with_exit_2(args):
    line = one_line(run(*args), code=2)
    assert line.startswith("error: ") and line.endswith("--help)")
