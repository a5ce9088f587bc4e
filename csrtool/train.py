"""Pipeline step: train every dictionary of an activation set and write one dictionary file.

    train_dicts(acts_dir, out, cfg, layers, device, progress) -> report
    training_vectors(reader, cfg) -> rows each dictionary trains on (one process)

For each selected layer and kind (k, v), each group G (every KV head with scope
'head', all heads stacked with scope 'layer') and each channel chunk C (values
split into `value_split` chunks of D / C channels, keys never split), one
NeuralDict is trained (on the vectors minus their mean, with cfg.center,
the default; the means are stored as `layer.{l}.{k|v}.mean` [G, D]); they are assembled into tensors `layer.{l}.{k|v}`
[G, C, N, Dc] and written with csrtool.formats.dicts.save_dicts, atomically.

With cfg.predictor (train-dict --predictor), each layer and kind first gets the token
predictor's least-squares map (csrtool.predictor.fit_map, over all collected rows and the
context-free K/V `predict(layer, kind, ids)` of their tokens), and the dictionaries are
trained on what it leaves; the maps are written with the atoms (`layer.{l}.{k|v}.pmap`).

With cfg.cross_layer (train-dict --cross-layer), layers are trained in order from layer 0, and
each layer and kind also gets a cross-layer map (csrtool.crosslayer.fit) from the cfg.cross_depth layers below's
(and, for values, its own keys') calibration vectors as the decoder will have them: coded with
their trained dictionaries at XREF_SPARSITY atoms (OMP) and decoded. The dictionaries are trained
on what both predictions leave; the maps are written as `layer.{l}.{k|v}.xmap`. They train on
the same XREF_TOKENS of the collected tokens at every layer (decoding each layer's inputs is the
cost of training in order); the token predictor's maps are still fitted on all of them.

Resume: finished dictionaries go to a side directory `OUT.partial/` (one small
safetensors file per dictionary plus `state.json` with the config and the
activation fingerprint they were trained with, and the marker file MARKER that
makes it ours: a directory of that name without it is refused, never removed). A re-run with the same config
and activations loads them instead of retraining; the side directory is removed
once the output is written. Per-dictionary seeds derive from (cfg.seed, name),
so a resumed run writes the same atoms and metadata as an uninterrupted one.

Under torchrun (`dist`, csrtool.distributed.Dist with world > 1), mode 'shard'
gives each rank every world-th dictionary; each one depends only on its own seed
and rows, so the gathered file is byte-identical to a one-process run. Mode 'data'
trains every dictionary on all ranks together, each rank reading its own slice of
the activation shards (csrtool.engine.comm). 'auto' is 'shard' unless there are
fewer dictionaries than ranks. Rank 0 writes the file after every rank succeeded;
there is no OUT.partial/ resume under torchrun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from csrtool.distributed import Dist
from csrtool.engine.comm import LOCAL, Comm, count
from csrtool.formats.acts import MANIFEST, ActsReader
from csrtool.formats.dicts import KINDS, dict_name, save_dicts
from csrtool.engine.neuraldict import TrainConfig, split_sizes, train_dictionary, training_bytes
from csrtool.errors import CsrError
from csrtool.formats.io import atomic_path, atomic_write_bytes, remove_stale_temporaries
from csrtool.formats.stwrite import save_safetensors

Predict = Callable[[int, str, torch.Tensor], torch.Tensor]  # (layer, kind, ids [T]) -> context-free K/V [T, H, D]

# progress(event, info): "start" {total, resumed}, "dict" {name, epochs},
# "epoch" {name, epoch, epochs, val_rel_err}, "done" {name, stats, resumed}
Progress = Callable[[str, dict], None]

XREF_SPARSITY = 4  # atoms per vector of the decoded inputs the cross-layer maps are fitted on (the 1- and 2-bit budgets code ~3-8)
XREF_TOKENS = 32768  # collected tokens (a random subset above this; collect's default is all of them) the cross-layer maps and dictionaries train on: each one's
                     # inputs are decoded at every layer, the cost of training in order (docs/quality.md, thirteenth pass)
XREF_TOKENS_PER_INPUT = 8  # the default cross-layer prediction wants this many collected tokens per map input ((2·depth + 1)·H·D of them)
STATE = "state.json"
MARKER = ".csrtool-train-dict"  # only a side directory holding this file is ours to remove
DIST_MODES = ("auto", "shard", "data")
VALUE_CHUNK = 128  # train-dict's default value chunk: wider value vectors are split into chunks of this many channels, one
                   # dictionary each (Gemma-3's 256: 2 chunks; 1-bit KL -5% to -12%, 2-bit level: docs/quality.md, fifteenth pass)


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def unit_name(layer: int, kind: str, group: int, chunk: int) -> str:
    """One trained dictionary: `layer.{l}.{k|v}.g{group}.c{chunk}`."""
    return f"{dict_name(layer, kind)}.g{group}.c{chunk}"


def unit_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


def acts_fingerprint(reader: ActsReader) -> str:
    """sha256 over the manifest and every shard's bytes: identifies the training data."""
    h = hashlib.sha256((reader.dir / MANIFEST).read_bytes())
    for shard in reader.manifest["shards"]:
        h.update(shard.encode())
        with open(reader.dir / shard, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def group_vectors(x: torch.Tensor, scope: str, group: int, chunk: int, chunks: int) -> torch.Tensor:
    """Training rows [B, Dc] of one dictionary from x [T, H, D]."""
    d = x.shape[2]
    dc = d // chunks
    xs = x[:, group] if scope == "head" else x.reshape(-1, d)  # [T, D] or [T*H, D]
    return xs[:, chunk * dc : (chunk + 1) * dc].contiguous()


def default_value_split(head_dim: int) -> int:
    """The value chunks train-dict uses unless told: chunks of VALUE_CHUNK channels where head_dim is a multiple above it, else whole vectors."""
    return head_dim // VALUE_CHUNK if head_dim > VALUE_CHUNK and head_dim % VALUE_CHUNK == 0 else 1


def training_vectors(reader: ActsReader, cfg: TrainConfig) -> int:
    """Rows each dictionary of `reader`'s collection trains on in one process (group_vectors, then the held-out split
    and the max_vectors cap of neuraldict.split_sizes)."""
    return split_sizes(reader.tokens * (reader.num_kv_heads if cfg.scope == "layer" else 1), cfg)[0]


class _Partial:
    """The side directory of finished dictionaries, marked as ours by MARKER.

    A directory under that name without the marker is someone else's: it is never
    removed or written into (issue 14.1); an empty one is adopted. A unit file that
    does not load (truncated, corrupted, wrong shape) is retrained, not fatal.
    """

    def __init__(self, out: Path, cfg: TrainConfig, fp: str):
        self.dir = partial_dir(out)
        self.key = {"config": cfg.to_dict(), "acts_fingerprint": fp}
        self.done: dict[str, dict] = {}
        if self.dir.is_symlink() or (self.dir.exists() and not self.dir.is_dir()):
            raise CsrError(f"{self.dir} exists and is not a directory: train-dict keeps its resume state there; move it away or pick another --output")
        if self.dir.is_dir() and not (self.dir / MARKER).is_file():
            if any(self.dir.iterdir()):
                raise CsrError(f"{self.dir} exists but was not created by csrtool train-dict (no {MARKER} in it), so it is "
                               f"left alone: move or delete it yourself, or pick another --output")
            self.dir.rmdir()  # empty: nothing to lose
        if (self.dir / MARKER).is_file():
            remove_stale_temporaries(self.dir)
            try:
                saved = json.loads((self.dir / STATE).read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                saved = {}
            if isinstance(saved, dict) and {k: saved.get(k) for k in self.key} == self.key and isinstance(saved.get("done"), dict):
                self.done = {n: s for n, s in saved["done"].items() if (self.dir / f"{n}.safetensors").is_file()}
            if not self.done:
                self.remove()  # ours and stale: another config or other activations

    def load(self, name: str, shape: tuple[int, int]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(atoms [N, Dc], mean [Dc]) of a finished unit, or None if its file is unusable."""
        try:
            t = load_file(str(self.dir / f"{name}.safetensors"))
            a, mu = t["atoms"], t["mean"]
        except Exception:  # truncated or corrupted by whatever interrupted the run: train it again
            return None
        if tuple(a.shape) != shape or tuple(mu.shape) != shape[1:] or not (a.isfinite().all() and mu.isfinite().all()):
            return None
        return a, mu

    def add(self, name: str, atoms: torch.Tensor, mean: torch.Tensor, stats: dict) -> None:
        if not (self.dir / MARKER).is_file():  # the constructor made sure the directory is absent or ours
            self.dir.mkdir(exist_ok=True)
            atomic_write_bytes(self.dir / MARKER, b"csrtool train-dict resume state; removed when the output is written\n")
        with atomic_path(self.dir / f"{name}.safetensors") as tmp:
            save_file({"atoms": atoms.detach().to("cpu", torch.float32).contiguous(),  # resume scratch: bytes need not repeat
                       "mean": mean.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
        self.done[name] = stats
        state = {**self.key, "done": self.done}
        atomic_write_bytes(self.dir / STATE, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def remove(self) -> None:
        """Remove the files we write (units, state, marker, our temporaries), then the directory if empty."""
        if not (self.dir / MARKER).is_file():
            return
        remove_stale_temporaries(self.dir)
        for f in self.dir.iterdir():
            if f.name == STATE or (f.name.startswith("layer.") and f.name.endswith(".safetensors")):
                f.unlink(missing_ok=True)
        (self.dir / MARKER).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # something else was put there: leave it
            self.dir.rmdir()


def _fit(xv: torch.Tensor, cfg: TrainConfig, name: str, emit: Progress, comm: Comm = LOCAL) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train one dictionary on rows xv [B, Dc] (this rank's rows with a data-parallel comm): (atoms, mean, stats) on CPU."""
    if not cfg.center:
        mu = torch.zeros_like(xv[0])
    else:
        mu = xv.mean(0) if comm.world == 1 else comm.sum(xv.sum(0)) / count(comm, xv.shape[0])
    emit("dict", {"name": name, "epochs": cfg.epochs})

    def on_epoch(epoch: int, epochs: int, val: float) -> None:
        emit("epoch", {"name": name, "epoch": epoch, "epochs": epochs, "val_rel_err": val})

    a, stats = train_dictionary(xv - mu, cfg, seed=unit_seed(cfg.seed, name), progress=on_epoch, comm=comm)
    return a.cpu(), mu.cpu(), stats


class _Rows:
    """A layer's training rows [T, H, D]: as collected, or what the token predictor (and the cross-layer map) leaves of them."""

    def __init__(self, reader: ActsReader, device, predict: Optional[Predict], depth: int = 0, cross: int = 0, seed: int = 0):
        self.reader, self.device, self.predict, self.depth, self.cross, self.seed = reader, device, predict, depth, cross, seed
        self.tokens = None  # with cross-layer maps: the collected tokens (at most XREF_TOKENS) every layer trains on
        self.ids = None
        if predict is not None:
            from csrtool.predictor import collection_ids

            self.ids = collection_ids(reader)
        self.maps: dict[str, torch.Tensor] = {}
        self.xmaps: dict[str, torch.Tensor] = {}
        self.decoded = None
        self.exact: dict[str, torch.Tensor] = {}  # name -> the collected rows, until settle() has decoded them
        if cross:
            from csrtool.crosslayer import Decoded

            self.decoded = Decoded()

    def predicts(self, layer: int) -> bool:
        """Whether the token predictor serves this layer (predictor_depth: the first layers only)."""
        return self.predict is not None and (self.depth == 0 or layer < self.depth)

    def load(self, layer: int, kind: str) -> torch.Tensor:
        x = self.reader.load(layer, kind)
        if self.predicts(layer):
            from csrtool.predictor import fit_prediction

            a, pred = fit_prediction(x, self.predict(layer, kind, self.ids))
            self.maps[dict_name(layer, kind)] = a
            x, exact = x - pred, x
        else:
            exact = x
        if self.decoded is not None:
            from csrtool import crosslayer

            if self.tokens is None:  # the same tokens for every layer: the maps read the layer below's rows of them
                t = x.shape[0]
                gen = torch.Generator().manual_seed(self.seed)
                self.tokens = torch.arange(t) if t <= XREF_TOKENS else torch.randperm(t, generator=gen)[:XREF_TOKENS].sort().values
            x, exact = x[self.tokens], exact[self.tokens]
            parts = [self.decoded.get(*src, 0, x.shape[0]) for src in crosslayer.inputs(layer, kind, self.cross)]
            if parts:
                w = crosslayer.fit(crosslayer.features(parts)[0], x)
                self.xmaps[dict_name(layer, kind)] = w
                x = x - crosslayer.predict(w, parts)[0].transpose(0, 1)
            self.exact[dict_name(layer, kind)] = exact
        return x.to(self.device)

    def settle(self, layer: int, kind: str, x: torch.Tensor, atoms: torch.Tensor, means: torch.Tensor | None, scope: str) -> None:
        """With cross-layer maps: keep (layer, kind)'s calibration vectors as the decoder will have them, coded at
        XREF_SPARSITY with their trained dictionaries ([G, C, N, Dc]; means [G, D]) from what the predictions left, x [T, H, D]."""
        if self.decoded is None:
            return
        from csrtool.engine import pursuit

        exact = self.exact.pop(dict_name(layer, kind))
        d = x.shape[2]
        g_n, c_n, _, dc = atoms.shape
        err = torch.empty_like(x)
        for g in range(g_n):
            for c in range(c_n):
                rows = group_vectors(x, scope, g, c, c_n)
                if means is not None:
                    rows = rows - means[g, c * dc : (c + 1) * dc].to(rows.device)
                a = atoms[g, c].to(rows.device)
                # fast: bf16 correlations pick the atoms where the hardware has them (exact coefficients), 1.3x faster;
                # the bf16 argmax alone (no refined pick: these codes are only the maps' inputs, and the refinement
                # cost 1.3x here for nothing measured; docs/quality.md, eighteenth and nineteenth passes)
                idx, coef = pursuit.encode(rows, a, min(XREF_SPARSITY, a.shape[0]), "omp", fast=True, refine=False)
                e = (rows - pursuit.decode(idx, coef, a)).to(err.dtype)
                view = err[:, g] if scope == "head" else err.reshape(-1, d)
                view[:, c * dc : (c + 1) * dc] = e
        self.decoded.put(layer, kind, 0, (exact.to(err.device) - err)[None].transpose(1, 2))


def _train_ranks(rows: _Rows, units: list, cfg: TrainConfig, chunks: dict, device, dist: Dist, mode: str,
                 emit: Progress) -> dict[str, tuple]:
    """Every unit's (atoms, mean, stats), trained by all ranks of `dist` in `mode`; the same dict on every rank."""
    reader = rows.reader
    if mode == "shard":
        def work() -> dict[str, tuple]:
            got, x, loaded = {}, None, None
            for layer, kind, g, c in dist.share(units):
                if loaded != (layer, kind):
                    x, loaded = rows.load(layer, kind), (layer, kind)
                name = unit_name(layer, kind, g, c)
                got[name] = _fit(group_vectors(x, cfg.scope, g, c, chunks[kind]), cfg, name, emit)
                emit("done", {"name": name, "stats": got[name][2], "resumed": False})
            return got

        return {n: r for part in dist.gather(dist.settle(work, "training")) for n, r in part.items()}
    if cfg.predictor:
        raise CsrError("--dist data cannot fit the token predictor (each rank holds part of the rows): use --dist shard")
    shards = dist.share(reader.manifest["shards"])
    if not shards:
        raise CsrError(f"{reader.dir} has {len(reader.manifest['shards'])} shards, fewer than the {dist.world} ranks of --dist data: "
                       "collect more tokens or use --dist shard")
    got = {}
    for layer, kind in dict.fromkeys((u[0], u[1]) for u in units):
        x = dist.settle(lambda: reader.load(layer, kind, shards=shards).to(device), "reading activations")  # noqa: B023
        for _, _, g, c in (u for u in units if u[:2] == (layer, kind)):
            name = unit_name(layer, kind, g, c)
            got[name] = _fit(group_vectors(x, cfg.scope, g, c, chunks[kind]), cfg, name, emit, comm=dist)
            emit("done", {"name": name, "stats": got[name][2], "resumed": False})
    return got


def _source(reader: ActsReader, fp: str) -> dict:
    m = reader.manifest
    src = {k: m.get(k) for k in ("model", "model_type", "key_space", "num_kv_heads", "head_dim", "tokens", "seq_len", "text_source", "dtype")}
    if m.get("rope") is not None:
        src["rope"] = m["rope"]
    src["acts_fingerprint"] = fp
    return src


def train_dicts(
    acts_dir: Path | ActsReader,
    out: Path,
    cfg: TrainConfig,
    layers: Optional[list[int]] = None,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
    calibrate: Optional[Callable[..., dict]] = None,
    dist: Optional[Dist] = None,
    dist_mode: str = "auto",
    predict: Optional[Predict] = None,
) -> dict[str, Any]:
    """Train all dictionaries for `layers` (default: all collected) and write `out`.

    `calibrate(atoms, source, means, maps, xmaps, config) -> sensitivity` (csrtool.calibration.calibrate), if given, runs
    before the file is written and its result is stored in it.
    `predict` (needed with cfg.predictor): the token predictor's context-free K/V, csrtool.predictor.TokenPredictor.kv.
    Returns a report: {"out", "fingerprint", "config", "source", "errors", "trained", "resumed", "sensitivity"}
    with errors["layer.{l}.{k}"] = {"train_rel_err": [G][C], "val_rel_err": [G][C], ...}.
    `dist`/`dist_mode`: see the module doc; only rank 0 writes `out`, every rank returns the report.
    """
    dist = dist or Dist()
    if dist_mode not in DIST_MODES:
        raise CsrError(f"--dist {dist_mode!r} is not one of {', '.join(DIST_MODES)}")
    emit = progress or (lambda event, info: None)
    reader = acts_dir if isinstance(acts_dir, ActsReader) else ActsReader(acts_dir)  # the CLI's, its token ids read once
    have = reader.layers
    layers = have if layers is None else layers
    missing = [layer for layer in layers if layer not in have]
    if missing:
        raise CsrError(f"layers {missing} are not in {reader.dir} (it has layers {have[0]}-{have[-1]}): collect them or pick others with --layers")
    h, d = reader.num_kv_heads, reader.head_dim
    if d % cfg.value_split:
        raise CsrError(f"value_split {cfg.value_split} does not divide head_dim {d}: pick a divisor of {d}")
    if reader.tokens < 2:
        raise CsrError(f"{reader.dir} holds {reader.tokens} tokens: collect at least a few hundred")
    if cfg.sparsity > d // cfg.value_split:
        raise CsrError(f"sparsity {cfg.sparsity} is more atoms per vector than the {d // cfg.value_split} channels of a "
                       f"{'value chunk' if cfg.value_split > 1 else 'vector'}: pass --sparsity {max(1, d // cfg.value_split // 8)} or so")
    _check_memory(cfg, d, device)
    if cfg.predictor and predict is None:
        raise CsrError("training for the token predictor needs the model's context-free K/V (predict=): use csrtool train-dict")
    if cfg.cross_layer:
        if dist.world > 1:
            raise CsrError("--cross-layer trains the layers in order, one after the other: run it in one process (not under torchrun)")
        if sorted(layers) != list(range(len(layers))):
            raise CsrError("--cross-layer predicts each layer from the one below: train every layer from 0 (without --layers)")
    rows = _Rows(reader, device, predict if cfg.predictor else None, cfg.predictor_depth, cfg.cross_depth if cfg.cross_layer else 0, cfg.seed)
    n_groups = h if cfg.scope == "head" else 1
    chunks = {"k": 1, "v": cfg.value_split}

    fp = acts_fingerprint(reader)
    units = [(layer, kind, g, c) for layer in layers for kind in KINDS for g in range(n_groups) for c in range(chunks[kind])]
    ranked: dict[str, tuple] = {}  # trained by the ranks of a torchrun job
    if dist.world > 1:
        mode = dist_mode if dist_mode != "auto" else ("shard" if len(units) >= dist.world or cfg.predictor else "data")
        emit("start", {"total": len(dist.share(units)) if mode == "shard" else len(units), "resumed": 0})  # this rank's bar
        ranked = _train_ranks(rows, units, cfg, chunks, device, dist, mode, emit)
    else:
        part = _Partial(out, cfg, fp)
        emit("start", {"total": len(units), "resumed": sum(unit_name(*u) in part.done for u in units)})

    atoms: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}
    errors: dict[str, dict] = {}
    trained = resumed = 0
    for layer in layers:
        for kind in KINDS:
            c_n = chunks[kind]
            x = None  # loaded lazily: a fully resumed layer is never read (except for its predictor and cross-layer maps)
            if (rows.predicts(layer) and dict_name(layer, kind) not in rows.maps) or cfg.cross_layer:
                x = rows.load(layer, kind)
            grid: list[list[torch.Tensor]] = []
            mean_grid: list[torch.Tensor] = []
            stat_grid: list[list[dict]] = []
            for g in range(n_groups):
                row, mrow, srow = [], [], []
                for c in range(c_n):
                    name = unit_name(layer, kind, g, c)
                    loaded = part.load(name, (cfg.atoms, d // c_n)) if not ranked and name in part.done else None
                    if name in ranked:
                        a, mu, stats = ranked[name]
                        trained += 1
                    elif loaded is not None:
                        (a, mu), stats = loaded, part.done[name]
                        resumed += 1
                        emit("done", {"name": name, "stats": stats, "resumed": True})
                    else:
                        if x is None:
                            x = rows.load(layer, kind)  # [T, H, D]
                        a, mu, stats = _fit(group_vectors(x, cfg.scope, g, c, c_n), cfg, name, emit)
                        part.add(name, a, mu, stats)
                        trained += 1
                        emit("done", {"name": name, "stats": stats, "resumed": False})
                    row.append(a)
                    mrow.append(mu)
                    srow.append(stats)
                grid.append(row)
                mean_grid.append(torch.cat(mrow))
                stat_grid.append(srow)
            atoms[dict_name(layer, kind)] = torch.stack([torch.stack(r) for r in grid])  # [G, C, N, Dc]
            if cfg.center:
                means[dict_name(layer, kind)] = torch.stack(mean_grid)  # [G, D]
            rows.settle(layer, kind, x, atoms[dict_name(layer, kind)], means.get(dict_name(layer, kind)), cfg.scope)  # no-op without cross-layer maps
            errors[dict_name(layer, kind)] = {
                key: [[s[key] for s in r] for r in stat_grid] for key in ("train_rel_err", "val_rel_err", "init_val_rel_err", "epochs")
            }
            errors[dict_name(layer, kind)]["mean_val_rel_err"] = _mean([s["val_rel_err"] for r in stat_grid for s in r])
            errors[dict_name(layer, kind)]["mean_train_rel_err"] = _mean([s["train_rel_err"] for r in stat_grid for s in r])
            del x

    config = cfg.to_dict()
    source = _source(reader, fp)
    if cfg.predictor:
        from csrtool.predictor import PREFIX_TEXT

        source["predictor_prefix"] = PREFIX_TEXT
        source["predictor_context"] = cfg.predictor_context
    maps = {name: rows.maps[name] for name in atoms if name in rows.maps}
    xmaps = dict(rows.xmaps)
    sensitivity = calibrate(atoms, source, means, maps, xmaps, config) if calibrate is not None else {}

    def write() -> Optional[str]:
        return save_dicts(Path(out), atoms, config=config, source=source, errors=errors, sensitivity=sensitivity, means=means,
                          maps=maps, xmaps=xmaps) if dist.root else None

    fingerprint = dist.gather(dist.settle(write, "writing the dictionary file"))[0]
    if dist.world == 1:
        part.remove()
    return {
        "out": str(out),
        "fingerprint": fingerprint,
        "config": config,
        "source": {k: v for k, v in source.items() if k != "rope"},
        "errors": errors,
        "trained": trained,
        "resumed": resumed,
        "sensitivity": {k: v for k, v in sensitivity.items() if k != "curves"},
    }


def _check_memory(cfg: TrainConfig, d: int, device: str | torch.device) -> None:
    """Refuse a configuration that cannot fit, before any work (e.g. --atoms 1000000000)."""
    need = training_bytes(cfg, d)
    dev = torch.device(device)
    if dev.type == "cuda":
        have, what = torch.cuda.mem_get_info(dev)[1], f"{dev} has"
    else:
        try:
            have, what = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
        except (ValueError, OSError, AttributeError):
            return
    if need > have:
        raise CsrError(f"--atoms {cfg.atoms} needs about {need / 2**30:.1f} GiB to train but {what} "
                       f"{have / 2**30:.1f} GiB: use fewer atoms (e.g. --atoms 4096)")


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
