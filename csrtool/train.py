"""Pipeline step: train every dictionary of an activation set and write one dictionary file.

    train_dicts(acts_dir, out, cfg, layers, device, progress) -> report

For each selected layer and kind (k, v), each group G (every KV head with scope
'head', all heads stacked with scope 'layer') and each channel chunk C (values
split into `value_split` chunks of D / C channels, keys never split), one
NeuralDict is trained (on the vectors minus their mean, with cfg.center,
the default; the means are stored as `layer.{l}.{k|v}.mean` [G, D]); they are assembled into tensors `layer.{l}.{k|v}`
[G, C, N, Dc] and written with csrtool.formats.dicts.save_dicts, atomically.

Resume: finished dictionaries go to a side directory `OUT.partial/` (one small
safetensors file per dictionary plus `state.json` with the config and the
activation fingerprint they were trained with). A re-run with the same config
and activations loads them instead of retraining; the side directory is removed
once the output is written. Per-dictionary seeds derive from (cfg.seed, name),
so a resumed run writes the same atoms and metadata as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from csrtool.formats.acts import MANIFEST, ActsReader
from csrtool.formats.dicts import KINDS, dict_name, save_dicts
from csrtool.engine.neuraldict import TrainConfig, train_dictionary
from csrtool.errors import CsrError
from csrtool.formats.io import atomic_path, atomic_write_bytes

# progress(event, info): "start" {total, resumed}, "dict" {name, epochs},
# "epoch" {name, epoch, epochs, val_rel_err}, "done" {name, stats, resumed}
Progress = Callable[[str, dict], None]

STATE = "state.json"


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


class _Partial:
    """The side directory of finished dictionaries."""

    def __init__(self, out: Path, cfg: TrainConfig, fp: str):
        self.dir = partial_dir(out)
        self.key = {"config": cfg.to_dict(), "acts_fingerprint": fp}
        self.done: dict[str, dict] = {}
        state = self.dir / STATE
        if state.is_file():
            try:
                saved = json.loads(state.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                saved = {}
            if {k: saved.get(k) for k in self.key} == self.key:
                self.done = {n: s for n, s in saved.get("done", {}).items() if (self.dir / f"{n}.safetensors").is_file()}
        if not self.done and self.dir.exists():
            shutil.rmtree(self.dir)  # stale: another config or other activations

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        t = load_file(str(self.dir / f"{name}.safetensors"))
        return t["atoms"], t["mean"]

    def add(self, name: str, atoms: torch.Tensor, mean: torch.Tensor, stats: dict) -> None:
        self.dir.mkdir(exist_ok=True)
        with atomic_path(self.dir / f"{name}.safetensors") as tmp:
            save_file({"atoms": atoms.detach().to("cpu", torch.float32).contiguous(),  # resume scratch: bytes need not repeat
                       "mean": mean.detach().to("cpu", torch.float32).contiguous()}, str(tmp))
        self.done[name] = stats
        state = {**self.key, "done": self.done}
        atomic_write_bytes(self.dir / STATE, (json.dumps(state, indent=1, sort_keys=True) + "\n").encode())

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _source(reader: ActsReader, fp: str) -> dict:
    m = reader.manifest
    src = {k: m.get(k) for k in ("model", "model_type", "key_space", "num_kv_heads", "head_dim", "tokens", "seq_len", "text_source", "dtype")}
    if m.get("rope") is not None:
        src["rope"] = m["rope"]
    src["acts_fingerprint"] = fp
    return src


def train_dicts(
    acts_dir: Path,
    out: Path,
    cfg: TrainConfig,
    layers: Optional[list[int]] = None,
    device: str | torch.device = "cpu",
    progress: Optional[Progress] = None,
    calibrate: Optional[Callable[[dict[str, torch.Tensor], dict, dict[str, torch.Tensor]], dict]] = None,
) -> dict[str, Any]:
    """Train all dictionaries for `layers` (default: all collected) and write `out`.

    `calibrate(atoms, source, means) -> sensitivity` (csrtool.calibration.calibrate), if given, runs
    before the file is written and its result is stored in it.
    Returns a report: {"out", "fingerprint", "config", "source", "errors", "trained", "resumed", "sensitivity"}
    with errors["layer.{l}.{k}"] = {"train_rel_err": [G][C], "val_rel_err": [G][C], ...}.
    """
    emit = progress or (lambda event, info: None)
    reader = ActsReader(acts_dir)
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
    n_groups = h if cfg.scope == "head" else 1
    chunks = {"k": 1, "v": cfg.value_split}

    fp = acts_fingerprint(reader)
    part = _Partial(out, cfg, fp)
    units = [(layer, kind, g, c) for layer in layers for kind in KINDS for g in range(n_groups) for c in range(chunks[kind])]
    emit("start", {"total": len(units), "resumed": sum(unit_name(*u) in part.done for u in units)})

    atoms: dict[str, torch.Tensor] = {}
    means: dict[str, torch.Tensor] = {}
    errors: dict[str, dict] = {}
    trained = resumed = 0
    for layer in layers:
        for kind in KINDS:
            c_n = chunks[kind]
            x = None  # loaded lazily: a fully resumed layer is never read
            grid: list[list[torch.Tensor]] = []
            mean_grid: list[torch.Tensor] = []
            stat_grid: list[list[dict]] = []
            for g in range(n_groups):
                row, mrow, srow = [], [], []
                for c in range(c_n):
                    name = unit_name(layer, kind, g, c)
                    if name in part.done:
                        (a, mu), stats = part.load(name), part.done[name]
                        resumed += 1
                        emit("done", {"name": name, "stats": stats, "resumed": True})
                    else:
                        if x is None:
                            x = reader.load(layer, kind).to(device)  # [T, H, D]
                        xv = group_vectors(x, cfg.scope, g, c, c_n)
                        mu = xv.mean(0) if cfg.center else torch.zeros_like(xv[0])
                        xv = xv - mu
                        emit("dict", {"name": name, "epochs": cfg.epochs})

                        def on_epoch(epoch: int, epochs: int, val: float, _name: str = name) -> None:
                            emit("epoch", {"name": _name, "epoch": epoch, "epochs": epochs, "val_rel_err": val})

                        a, stats = train_dictionary(xv, cfg, seed=unit_seed(cfg.seed, name), progress=on_epoch)
                        a, mu = a.cpu(), mu.cpu()
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
            errors[dict_name(layer, kind)] = {
                key: [[s[key] for s in r] for r in stat_grid] for key in ("train_rel_err", "val_rel_err", "init_val_rel_err", "epochs")
            }
            errors[dict_name(layer, kind)]["mean_val_rel_err"] = _mean([s["val_rel_err"] for r in stat_grid for s in r])
            errors[dict_name(layer, kind)]["mean_train_rel_err"] = _mean([s["train_rel_err"] for r in stat_grid for s in r])
            del x

    config = cfg.to_dict()
    source = _source(reader, fp)
    sensitivity = calibrate(atoms, source, means) if calibrate is not None else {}
    fingerprint = save_dicts(Path(out), atoms, config=config, source=source, errors=errors, sensitivity=sensitivity, means=means)
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


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")
