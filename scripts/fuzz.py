"""Fuzz csrtool's CLI and file readers as a hostile or unlucky user would (issue 14).

    python scripts/fuzz.py --quick --seed 0 --json fuzz.json

Builds its own inputs in a temporary directory from a tiny random model
(tests/tiny.py): an activation set, a dictionary file, a cache and a .csr file.
Then it tries, per category of issue 14, truncations, bit flips, header edits
with the checksum recomputed, malformed cache and dictionary contents,
out-of-range options, unwritable outputs, signals and repeated runs, each in
a fresh directory. Every try is classified:

    ok            exit 0 and the result reads back within tolerance
    clean_error   exit != 0 with one line on stderr starting with "error: "
    traceback     an uncaught exception, or an error that is not one clean line
    silent_wrong  exit 0 but the result is unreadable, non-finite, too far from
                  the input, not reproducible, or user data was destroyed
    leftover      files left beside the outputs (temporaries, partial outputs)

Prints the counts (tried / clean error / traceback / silent wrong / leftover)
and, with --json, every try. Exit status 1 when any try is in the last three.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from csrtool.cli import app  # noqa: E402

BAD = ("traceback", "silent_wrong", "leftover")
PREAMBLE = struct.Struct("<8sHHI")  # .csr: magic, version, flags, header length (docs/format.md)
TOL = 1.0  # relative squared error above which an accepted result counts as wrong


@dataclass
class Try:
    category: str
    name: str
    outcome: str = ""
    detail: str = ""


class Fuzzer:
    def __init__(self, work: Path, seed: int, quick: bool):
        self.work, self.rng, self.quick = work, random.Random(seed), quick
        self.base = work / "base"
        self.tries: list[Try] = []
        self.runner = CliRunner()
        self.n = 0

    # ------------------------------------------------------------ running and classifying

    def cli(self, args: list) -> tuple[int, str, str, Optional[BaseException]]:
        res = self.runner.invoke(app, [str(a) for a in args])
        exc = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
        return res.exit_code, res.stdout, res.stderr, exc

    def fresh(self) -> Path:
        self.n += 1
        d = self.work / f"t{self.n:05d}"
        d.mkdir()
        return d

    def record(self, t: Try, outcome: str, detail: str = "") -> None:
        t.outcome, t.detail = outcome, detail[:400]
        self.tries.append(t)

    def attempt(self, category: str, name: str, args: list, folder: Path, outputs: list[Path],
                verify: Optional[Callable[[], Optional[str]]] = None) -> Try:
        """Run the CLI; classify; on exit 0 `verify()` returns None (fine) or why the result is wrong."""
        t = Try(category, name)
        before = set(p.name for p in folder.iterdir())
        code, _, stderr, exc = self.cli(args)
        new = sorted(set(p.name for p in folder.iterdir()) - before - ({p.name for p in outputs} if code == 0 else set()))
        why = None
        if code == 0 and exc is None and verify is not None:
            try:
                why = verify()
            except Exception as e:  # the result does not read back
                why = f"result unreadable: {type(e).__name__}: {e}"
        self.record(t, *classify(code, stderr, exc, new, why))
        return t

    # ------------------------------------------------------------ inputs

    def build(self) -> None:
        from tiny import save_tiny

        self.base.mkdir()
        model = save_tiny(self.base / "model", "llama", layers=2)
        steps = [
            ["collect", "--model", model, "-o", self.base / "acts", "--max-tokens", "1200", "--seq-len", "128", "--keys", "pre-rope"],
            ["train-dict", self.base / "acts", "-o", self.base / "dicts.safetensors", "--atoms", "32", "--sparsity", "2",
             "--epochs", "1", "--no-calibrate", "--max-vectors", "1024"],
            ["cache", "--model", model, "--heldout", "--max-tokens", "96", "-o", self.base / "cache.pt"],
            ["compress", self.base / "cache.pt", "-d", self.base / "dicts.safetensors", "-o", self.base / "c.csr", "--sparsity", "2"],
        ]
        for args in steps:
            code, out, err, exc = self.cli(args)
            if code != 0 or exc is not None:
                raise SystemExit(f"building inputs failed at {args[0]}: {exc or err or out}")
        self.dicts, self.cache, self.csr = self.base / "dicts.safetensors", self.base / "cache.pt", self.base / "c.csr"

    # ------------------------------------------------------------ checks of accepted results

    def _rel(self, a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return float((a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-30))

    def check_cache(self, path: Path, reference: Optional[Path]) -> Optional[str]:
        from csrtool.formats.kvcache import load_cache

        back = load_cache(path)
        for kind, layers in (("keys", back.keys), ("values", back.values)):
            for i, t in enumerate(layers):
                if not torch.isfinite(t).all():
                    return f"{kind} layer {i}: {int((~torch.isfinite(t)).sum())} non-finite values"
        if reference is not None:
            ref = load_cache(reference)
            for kind, a, b in (("keys", back.keys, ref.keys), ("values", back.values, ref.values)):
                for i, (x, y) in enumerate(zip(a, b)):
                    if x.shape != y.shape:
                        return f"{kind} layer {i}: shape {tuple(x.shape)} != {tuple(y.shape)}"
                    if torch.isfinite(y).all() and self._rel(x, y) > TOL:
                        return f"{kind} layer {i}: relative error {self._rel(x, y):.3g} > {TOL}"
        return None

    def check_csr(self, path: Path, dicts: Path, reference: Optional[Path]) -> Optional[str]:
        """An accepted .csr must decompress (through the CLI) to a finite cache near the input."""
        back = path.with_name(path.name + ".back.pt")
        code, _, err, exc = self.cli(["decompress", path, "-d", dicts, "-o", back, "--force"])
        try:
            if exc is not None or code != 0:
                return f"written but not readable back: {exc or err.strip()}"
            return self.check_cache(back, reference)
        finally:
            back.unlink(missing_ok=True)

    # ------------------------------------------------------------ byte-level corruption

    def _positions(self, size: int, k: int) -> list[int]:
        fixed = [0, 1, 8, 12, 16, 17, size // 2, size - 33, size - 1]
        return sorted(set([p for p in fixed if 0 <= p < size] + [self.rng.randrange(size) for _ in range(k)]))

    def corrupt_files(self) -> None:
        k = 3 if self.quick else 40
        targets = [("csr", self.csr), ("dicts", self.dicts), ("cache", self.cache)]
        for kind, src in targets:
            data = src.read_bytes()
            for how in ("truncate", "bitflip"):
                for pos in self._positions(len(data), k):
                    d = self.fresh()
                    bad = d / src.name
                    bad.write_bytes(data[:pos] if how == "truncate" else
                                    data[:pos] + bytes([data[pos] ^ (1 << self.rng.randrange(8))]) + data[pos + 1:])
                    self._use(kind, f"{how} {src.name} @{pos}", bad, d)

    def _use(self, kind: str, name: str, bad: Path, d: Path, category: Optional[str] = None) -> None:
        """Feed a (possibly broken) file of `kind` to the command that reads it."""
        out = d / "o.csr" if kind != "csr" else d / "o.pt"
        if kind == "csr":
            args = ["decompress", bad, "-d", self.dicts, "-o", out]
            verify = lambda: self.check_cache(out, self.cache)  # noqa: E731
        elif kind == "dicts":
            args = ["compress", self.cache, "-d", bad, "-o", out, "--sparsity", "2"]
            verify = lambda: self.check_csr(out, bad, self.cache)  # noqa: E731
        else:
            args = ["compress", bad, "-d", self.dicts, "-o", out, "--sparsity", "2"]
            verify = lambda: self.check_csr(out, self.dicts, None)  # noqa: E731
        self.attempt(category or f"corrupt-{kind}", name, args, d, [out], verify)

    # ------------------------------------------------------------ .csr header edits (item 5, 8)

    def csr_header_edits(self) -> None:
        data = self.csr.read_bytes()
        magic, version, flags, hlen = PREAMBLE.unpack_from(data)
        header = json.loads(data[PREAMBLE.size:PREAMBLE.size + hlen])
        payload = data[PREAMBLE.size + hlen:-32]
        paths = list(_leaf_paths(header))
        values = [float("nan"), float("inf"), -1, 0, 1e300, 10**30, -(10**30), "abc", None, [], {}, [1, 2], True, 2**31, 0.5]
        edits = []
        for p in paths:
            for v in (values if not self.quick else self.rng.sample(values, 3)):
                edits.append((p, v))
        if self.quick:
            edits = self.rng.sample(edits, min(len(edits), 20))
        n_freq = len(header["rope"]["inv_freq"]) if isinstance(header.get("rope"), dict) else 4
        edits += [(("rope", "scaling"), v) for v in (float("inf"), float("nan"), 1e300, -1.0, 0.0, 10**400)]
        edits += [(("rope", "inv_freq"), v) for v in ([float("nan")] * n_freq, [float("inf")] * n_freq, [1.0] * (n_freq - 1), [10**400] * n_freq)]
        edits += [(("meta", "position_offset"), v) for v in (10**30, "abc", -5, 10**400)]
        edits += [(("codec", "sparsity_k"), 10**6), (("codec", "n_atoms"), 1), (("layers", 0, 2), 10**12), (("layers", 0, 0), 0)]
        raw = [("NaN literal", b'"scaling":NaN'), ("Infinity literal", b'"scaling":Infinity'), ("1e999999", b'"scaling":1e999999')]
        for p, v in edits:
            h = json.loads(json.dumps(header))
            try:
                _set(h, p, v)
            except (KeyError, IndexError, TypeError):
                continue  # this build has no such field
            text = json.dumps(h, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()
            self._csr_with(text, payload, magic, version, flags, f"{'.'.join(map(str, p))}={_short(v)}")
        base_text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        for name, lit in raw:
            if b'"scaling":1.0' not in base_text:
                continue
            text = base_text.replace(b'"scaling":1.0', lit)
            self._csr_with(text, payload, magic, version, flags, name)

    def verified_then_changed(self) -> None:
        """Item 6: bytes changed after open_csr verified the file must not decode as wrong data."""
        from csrtool.formats import csrfile
        from csrtool.formats.dicts import load_dicts

        ds = load_dicts(self.dicts)
        want = [k for _, k, _ in csrfile.open_csr(self.csr).layers(ds)]
        for pos in self._positions(self.csr.stat().st_size, 2 if self.quick else 10)[4:-2]:
            d = self.fresh()
            path = d / "c.csr"
            path.write_bytes(self.csr.read_bytes())
            t = Try("verified-then-changed", f"byte {pos} flipped after open_csr")
            try:
                reader = csrfile.open_csr(path)
                with open(path, "r+b") as fh:
                    fh.seek(pos)
                    b = fh.read(1)
                    fh.seek(pos)
                    fh.write(bytes([b[0] ^ 0xFF]))
                got = [k for _, k, _ in reader.layers(ds)]
            except Exception as e:
                from csrtool.errors import CsrError

                self.record(t, "clean_error" if isinstance(e, CsrError) else "traceback", f"{type(e).__name__}: {e}")
                continue
            same = all(torch.equal(a, b) for a, b in zip(got, want))
            self.record(t, "ok" if same else "silent_wrong", "" if same else "decoded changed bytes without an error")

    def _csr_with(self, text: bytes, payload: bytes, magic: bytes, version: int, flags: int, name: str) -> None:
        d = self.fresh()
        body = PREAMBLE.pack(magic, version, flags, len(text)) + text + payload
        bad = d / "edited.csr"
        bad.write_bytes(body + hashlib.sha256(body).digest())
        self._use("csr", f"header {name}", bad, d, "csr-header-edit")

    # ------------------------------------------------------------ cache contents (items 2, 4, 9, 10, 16)

    def cache_contents(self) -> None:
        from csrtool.formats.kvcache import load_cache

        kv = load_cache(self.cache)
        keys, values, meta = [k.clone() for k in kv.keys], [v.clone() for v in kv.values], dict(kv.meta)

        def with_(**changes):
            data = {"keys": keys, "values": values, "meta": meta}
            data.update(changes)
            return data

        big = [k.clone() for k in keys]
        big[0].fill_(3e38)
        half = [(k / k.abs().max() * 65000).half() for k in keys]
        cases = {
            "meta list": with_(meta=[1, 2]), "meta string": with_(meta="abc"), "no meta": {"keys": keys, "values": values},
            "NaN keys": with_(keys=[k.clone().fill_(float("nan")) for k in keys]),
            "int keys": with_(keys=[k.long() for k in keys]), "keys=5": with_(keys=5), "keys empty": with_(keys=[], values=[]),
            "float8 keys": with_(keys=[k.to(torch.float8_e4m3fn) for k in keys], values=[v.to(torch.float8_e4m3fn) for v in values]),
            "batch 0": with_(keys=[k[:0] for k in keys], values=[v[:0] for v in values]),
            "0 kv heads": with_(keys=[k[:, :0] for k in keys], values=[v[:, :0] for v in values]),
            "0 tokens": with_(keys=[k[:, :, :0] for k in keys], values=[v[:, :, :0] for v in values]),
            "layer at 3e38": with_(keys=big),
            "float16 near 65504": with_(keys=half, values=[(v / v.abs().max() * 65000).half() for v in values]),
            "shape mismatch": with_(values=[v[..., :-1] for v in values]),
            "layer count mismatch": with_(values=values[:-1]),
            "rope strings": with_(meta={**meta, "rope": {"inv_freq": "abc", "scaling": "x"}}),
            "position_offset abc": with_(meta={**meta, "position_offset": "abc"}),
            "position_offset huge": with_(meta={**meta, "position_offset": 10**30}),
            "key_space bogus": with_(meta={**meta, "key_space": "sideways"}),
            "tuple layout": tuple((k, v) for k, v in zip(keys, values)),
        }
        for name, obj in cases.items():
            d = self.fresh()
            bad = d / "bad.pt"
            torch.save(obj, bad)
            reference = bad if name in ("layer at 3e38", "float16 near 65504") else None
            out = d / "o.csr"
            self.attempt("cache-contents", name, ["compress", bad, "-d", self.dicts, "-o", out, "--sparsity", "2"], d, [out],
                         lambda: self.check_csr(out, self.dicts, reference))
        # a pickle that would run code (item 16): must be refused and must not run
        d = self.fresh()
        marker = d / "pwned"
        bad = d / "evil.pt"
        bad.write_bytes(pickle.dumps(_Evil(str(marker)), protocol=4))
        out = d / "o.csr"
        t = self.attempt("pickle", "code-running pickle", ["compress", bad, "-d", self.dicts, "-o", out, "--sparsity", "2"], d, [out])
        if marker.exists():
            t.outcome, t.detail = "silent_wrong", "the pickle ran code"

    # ------------------------------------------------------------ dictionary contents (items 2, 11)

    def dict_contents(self) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from csrtool.formats.dicts import MEAN_SUFFIX, fingerprint
        from csrtool.formats.stwrite import save_safetensors

        with safe_open(str(self.dicts), framework="pt") as fh:
            meta = dict(fh.metadata())
        tensors = load_file(str(self.dicts))
        first = sorted(k for k in tensors if not k.endswith(MEAN_SUFFIX))[0]
        mean = first + MEAN_SUFFIX
        cases: dict[str, tuple[dict, dict]] = {
            "version abc": (tensors, {**meta, "version": "abc"}), "version 99": (tensors, {**meta, "version": "99"}),
            "source [1,2]": (tensors, {**meta, "source": "[1, 2]"}), "source not json": (tensors, {**meta, "source": "{"}),
            "config list": (tensors, {**meta, "config": "[]"}), "errors string": (tensors, {**meta, "errors": '"x"'}),
            "no format": (tensors, {k: v for k, v in meta.items() if k != "format"}),
            "sensitivity string": (tensors, {**meta, "sensitivity": '"x"'}),
            "sensitivity bad curves": (tensors, {**meta, "sensitivity": json.dumps({"curves": {"layer.0.k": "x"}, "kl": {"layer.0.k": "y"}})}),
            "sensitivity NaN": (tensors, {**meta, "sensitivity": '{"kl": {"layer.0.k": NaN}, "curves": {"layer.0.k": [[1, NaN]]}}'}),
        }
        nan_atoms = dict(tensors)
        nan_atoms[first] = tensors[first].clone()
        nan_atoms[first][0, 0, 0, 0] = float("nan")
        cases["NaN atom, fingerprint valid"] = (nan_atoms, {**meta, "fingerprint": fingerprint(nan_atoms)})
        if mean in tensors:
            inf_mean = dict(tensors)
            inf_mean[mean] = tensors[mean].clone().fill_(float("inf"))
            cases["Inf mean, fingerprint valid"] = (inf_mean, {**meta, "fingerprint": fingerprint(inf_mean)})
        zero = dict(tensors)
        zero[first] = torch.zeros_like(tensors[first])
        cases["zero atoms, fingerprint valid"] = (zero, {**meta, "fingerprint": fingerprint(zero)})
        for name, (ts, md) in cases.items():
            d = self.fresh()
            bad = d / "bad.safetensors"
            save_safetensors(bad, ts, md)
            self._use("dicts", name, bad, d, "dict-contents")

    # ------------------------------------------------------------ options (items 3, 12, 17)

    def options(self) -> None:
        compress = [["--sparsity", s] for s in ("0", "-1", "5000", "4096", "8", "7", "a,b", "1,2,3", "2,")]
        compress += [["--bits", b] for b in ("abc", "-1", "0", "100", "nan", "inf", "1e9", "0.01")]
        compress += [["--window", "-1"], ["--window", str(10**12)], ["--sink", "-3"], ["--coef", "fp4"], ["--method", "lasso"],
                     ["--bits", "1", "--sparsity", "2"], ["--sparsity", "7", "--coef", "fp16"], ["--sparsity", "2", "--coef", "int8"]]
        for opts in compress:
            d = self.fresh()
            out = d / "o.csr"
            self.attempt("options-compress", " ".join(opts), ["compress", self.cache, "-d", self.dicts, "-o", out, *opts], d, [out],
                         lambda: self.check_csr(out, self.dicts, self.cache))
        train = [["--atoms", a] for a in ("0", "-5", "1000000000", "many")]
        train += [["--sparsity", "100"], ["--sparsity", "0"], ["--epochs", "-1"], ["--lr", "0"], ["--lr", "nan"], ["--batch-size", "0"],
                  ["--value-split", "3"], ["--value-split", "1000"], ["--layers", "bogus"], ["--layers", "99"], ["--max-vectors", "1"],
                  ["--scope", "model"], ["--encoder", "lasso"], ["--device", "tpu"]]
        if self.quick:
            train = self.rng.sample(train, 8)
        for opts in train:
            d = self.fresh()
            out = d / "d.safetensors"
            self.attempt("options-train-dict", " ".join(opts), ["train-dict", self.base / "acts", "-o", out, "--atoms", "16",
                         "--sparsity", "2", "--epochs", "0", "--no-calibrate", *opts], d, [out], lambda: _dicts_ok(out))

    # ------------------------------------------------------------ outputs and inputs (items 13, 17)

    def outputs(self) -> None:
        for name, mk in (("-o into a missing directory", lambda d: (d / "no" / "o.csr", [])),
                         ("-o is a directory", lambda d: (_mkdir(d / "o.csr"), [])),
                         ("--json nodir/r.json", lambda d: (d / "o.csr", ["--json", d / "nodir" / "r.json"])),
                         ("--json adir", lambda d: (d / "o.csr", ["--json", _mkdir(d / "adir")]))):
            d = self.fresh()
            out, extra = mk(d)
            self.attempt("outputs", name, ["compress", self.cache, "-d", self.dicts, "-o", out, "--sparsity", "2", *extra], d,
                         [out], lambda: self.check_csr(out, self.dicts, self.cache))
        if os.geteuid() != 0:
            d = self.fresh()
            ro = _mkdir(d / "ro")
            ro.chmod(0o500)
            self.attempt("outputs", "unwritable directory", ["compress", self.cache, "-d", self.dicts, "-o", ro / "o.csr", "--sparsity", "2"], d, [])
            ro.chmod(0o700)
        for what, path in (("cache", "cache"), ("dicts", "dicts"), ("csr", "csr")):
            d = self.fresh()
            self._use(what, f"{path} is a directory", _mkdir(d / f"{path}.in"), d, "inputs")
            d = self.fresh()
            self._use(what, f"{path} missing", d / "missing.in", d, "inputs")
        # file-size limit: needs its own process (the limit applies to the whole process)
        d = self.fresh()
        out = d / "o.csr"
        t = Try("outputs", "file-size limit 4 KiB")
        code, err = self.subprocess(["compress", self.cache, "-d", self.dicts, "-o", out, "--sparsity", "2"], fsize=4096)
        self._classify_subprocess(t, code, err, d, expect_nothing=True)

    # ------------------------------------------------------------ side directory of train-dict (items 1, 14)

    def partial_dirs(self) -> None:
        base = ["train-dict", self.base / "acts", "--atoms", "16", "--sparsity", "2", "--epochs", "1", "--no-calibrate", "--layers", "0"]
        d = self.fresh()
        out = d / "d.safetensors"
        part = _mkdir(d / "d.safetensors.partial")
        (part / "keep.txt").write_text("keep")
        t = self.attempt("partial-dir", "foreign OUT.partial with a user file", [*base, "-o", out], d, [out], lambda: _dicts_ok(out))
        if not (part / "keep.txt").is_file():
            t.outcome, t.detail = "silent_wrong", "the user's keep.txt was deleted"
        elif t.outcome == "leftover" and "partial" in t.detail:
            t.outcome = "ok" if out.exists() else t.outcome
        d = self.fresh()
        (d / "d.safetensors.partial").write_text("a file")
        self.attempt("partial-dir", "OUT.partial is a file", [*base, "-o", d / "d.safetensors"], d, [d / "d.safetensors"])
        # an interrupted run (in process: KeyboardInterrupt after the first dictionary), then a corrupted entry
        from csrtool.engine.neuraldict import TrainConfig
        from csrtool.train import partial_dir, train_dicts

        cfg = TrainConfig(atoms=16, sparsity=2, epochs=1, max_vectors=512)
        for how in ("truncated", "garbage", "empty", "state garbage"):
            d = self.fresh()
            out = d / "d.safetensors"

            def crash(event, info):
                if event == "done":
                    raise KeyboardInterrupt

            try:
                train_dicts(self.base / "acts", out, cfg, layers=[0], progress=crash)
            except KeyboardInterrupt:
                pass
            pd = partial_dir(out)
            unit = sorted(pd.glob("layer.*.safetensors"))[0]
            if how == "truncated":
                unit.write_bytes(unit.read_bytes()[:40])
            elif how == "garbage":
                unit.write_bytes(os.urandom(200))
            elif how == "empty":
                unit.write_bytes(b"")
            else:
                (pd / "state.json").write_text("{not json")
            self.attempt("partial-dir", f"{how} entry in OUT.partial", [*base, "-o", out, "--max-vectors", "512"], d, [out],
                         lambda: _dicts_ok(out))

    # ------------------------------------------------------------ reproducibility (items 7, 18)

    def reproducible(self) -> None:
        d = self.fresh()
        outs = [d / f"d{i}.safetensors" for i in range(2)]
        for o in outs:
            self.cli(["train-dict", self.base / "acts", "-o", o, "--atoms", "32", "--sparsity", "2", "--epochs", "2",
                      "--no-calibrate", "--max-vectors", "1024"])
        t = Try("reproducible", "train-dict twice, epochs 2, default threads")
        same = all(o.is_file() for o in outs) and outs[0].read_bytes() == outs[1].read_bytes()
        self.record(t, "ok" if same else "silent_wrong", "" if same else "two identical runs wrote different files")
        d = self.fresh()
        outs = [d / f"o{i}.pt" for i in range(2)]
        for o in outs:
            self.cli(["decompress", self.csr, "-d", self.dicts, "-o", o])
        same = all(o.is_file() for o in outs) and outs[0].read_bytes() == outs[1].read_bytes()
        self.record(Try("reproducible", "decompress twice"), "ok" if same else "silent_wrong",
                    "" if same else "two identical runs wrote different bytes")

    # ------------------------------------------------------------ signals (item 15)

    def signals(self) -> None:
        from csrtool.formats.kvcache import KVCache, load_cache, save_cache

        kv = load_cache(self.cache)
        reps = 48 if self.quick else 256  # a cache large enough that compress runs for a while
        big = self.base / "big.pt"
        save_cache(big, KVCache([k.repeat(1, 1, reps, 1) for k in kv.keys], [v.repeat(1, 1, reps, 1) for v in kv.values], kv.meta))
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL):
            d = self.fresh()
            out = d / "o.csr"
            args = ["compress", big, "-d", self.dicts, "-o", out, "--sparsity", "2"]
            proc = self._spawn(args)
            deadline = time.time() + 30
            while time.time() < deadline and proc.poll() is None and not any(".csrtmp-" in p.name for p in d.iterdir()):
                time.sleep(0.05)
            time.sleep(0.3)
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
            t = Try("signals", f"{signal.Signals(sig).name} during compress")
            left = sorted(p.name for p in d.iterdir() if p != out)
            if sig == signal.SIGKILL:  # nothing can clean up after kill -9: the next run must
                self.cli(args + ["--force"])
                left = sorted(p.name for p in d.iterdir() if p != out)
                t.name += ", then a re-run"
            if left:
                self.record(t, "leftover", str(left))
            elif sig != signal.SIGKILL and proc.returncode not in (0, 130, 143, -sig):
                self.record(t, "traceback", f"exit {proc.returncode}: {err.strip()[-300:]}")
            else:
                self.record(t, "ok", f"exit {proc.returncode}")

    def _spawn(self, args: list, fsize: Optional[int] = None) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))) if fsize else None
        return subprocess.Popen([sys.executable, "-c", "from csrtool.cli import main; main()", *map(str, args)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=pre)

    def subprocess(self, args: list, fsize: Optional[int] = None) -> tuple[int, str]:
        proc = self._spawn(args, fsize)
        _, err = proc.communicate(timeout=300)
        return proc.returncode, err

    def _classify_subprocess(self, t: Try, code: int, err: str, d: Path, expect_nothing: bool) -> None:
        lines = err.strip().splitlines()
        left = sorted(p.name for p in d.iterdir())
        if "Traceback" in err or (code != 0 and not (len(lines) == 1 and lines[0].startswith("error: "))):
            self.record(t, "traceback", f"exit {code}: {' | '.join(lines[-3:])}")
        elif code != 0 and left and expect_nothing:
            self.record(t, "leftover", str(left))
        else:
            self.record(t, "clean_error" if code else "ok", lines[0] if lines else "")

    # ------------------------------------------------------------ everything

    def run(self) -> None:
        self.build()
        for step in (self.options, self.outputs, self.cache_contents, self.dict_contents, self.csr_header_edits, self.verified_then_changed,
                     self.corrupt_files, self.partial_dirs, self.reproducible, self.signals):
            step()

    def counts(self) -> dict[str, int]:
        c = {"tried": len(self.tries)}
        for o in ("ok", "clean_error", *BAD):
            c[o] = sum(t.outcome == o for t in self.tries)
        return c


def classify(code: int, stderr: str, exc: Optional[BaseException], new_files: list[str], why: Optional[str]) -> tuple[str, str]:
    """(outcome, detail) of one CLI run: exit code, stderr, uncaught exception, files it left
    beside its outputs (all new files after an error) and, for exit 0, why the result is wrong."""
    lines = stderr.strip().splitlines()
    if exc is not None:
        return "traceback", f"{type(exc).__name__}: {exc}"
    if code != 0 and not (len(lines) == 1 and lines[0].startswith("error: ")):
        return "traceback", f"exit {code}, {len(lines)} stderr lines: {' | '.join(lines[-3:])}"
    if code == 0 and why:
        return "silent_wrong", why
    if new_files:
        return "leftover", f"{new_files}" + (f" after: {lines[0]}" if code else "")
    return ("clean_error", lines[0]) if code else ("ok", "")


class _Evil:
    """A pickle payload that would create a directory if unpickled unsafely."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:30] + f"...({len(r)} chars)"


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _dicts_ok(path: Path) -> Optional[str]:
    from csrtool.formats.dicts import load_dicts

    ds = load_dicts(path)
    bad = [k for k, t in ds.atoms.items() if not torch.isfinite(t).all()]
    return f"non-finite atoms in {bad}" if bad else None


def _leaf_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, prefix + (k,))
    elif isinstance(obj, list) and obj and not all(isinstance(x, (int, float)) for x in obj):
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, prefix + (i,))
    else:
        yield prefix


def _set(obj, path, value) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="A sample of every category (about 2 minutes on 2 cores).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the random positions, bits and samples.")
    ap.add_argument("--json", type=Path, help="Write the counts and every try to this file.")
    ap.add_argument("--keep", type=Path, help="Work in this directory and keep it (default: a temporary one).")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="csrfuzz-") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        fz = Fuzzer(work, args.seed, args.quick)
        fz.run()
    counts = fz.counts()
    print(f"tried {counts['tried']} / clean error {counts['clean_error']} / traceback {counts['traceback']} / "
          f"silent wrong {counts['silent_wrong']} / leftover {counts['leftover']} (ok {counts['ok']}; {time.time() - start:.0f} s)")
    for t in fz.tries:
        if t.outcome in BAD:
            print(f"  {t.outcome:12s} [{t.category}] {t.name}: {t.detail}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "quick": args.quick, "counts": counts,
                                         "tries": [asdict(t) for t in fz.tries]}, indent=1) + "\n")
    return 1 if any(counts[o] for o in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
