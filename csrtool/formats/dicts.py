"""Dictionary files: one safetensors file holding every trained dictionary.

Layout:
- tensor `layer.{l}.{k|v}.mean` (optional): float32 [G, D], the mean of the training
  vectors, subtracted before coding and added back after decoding (train-dict --center);
- tensor `layer.{l}.{k|v}.pmap` (optional, train-dict's token predictor): float32 [H, D + 2, D],
  the token predictor's map (csrtool.predictor): [p(t), 1] · A[h] (rows 0..D) is subtracted before
  the mean and added back after decoding, rounded to int8 after dividing by the channel scales
  of row D + 1 (files of csrtool before them: [H, D + 1, D], rounded per vector without them);
  p(t) comes from the model, so these files need it;
- tensor `layer.{l}.{k|v}.xmap` (optional, train-dict --cross-layer): float32 [F + 1, H·D], the
  cross-layer map (csrtool.crosslayer): the prediction from the decoded layers below (`config.cross_depth`
  of them, 1 where absent; and, for values, the layer's own decoded keys), subtracted with the mean and
  added back after decoding;
- tensor `layer.{l}.{k|v}`: float32 [G, C, N, Dc] -- G = KV heads (scope 'head') or 1
  (scope 'layer'), C = channel-split chunks (1 for keys, `value_split` for values),
  N atoms of Dc = D / C channels, each atom of unit norm;
- string metadata: `format` = 'csrtool-dicts', `version` (1; 2 when the predictor maps carry
  channel scales, so an older csrtool refuses what it would round differently; 3 with cross-layer
  maps, which an older csrtool would not apply; 4 when they read more than the layer just below,
  `config.cross_depth` layers), `config` (training config,
  JSON), `source` (model, key_space, num_kv_heads, head_dim, tokens, JSON),
  `errors` (per-dictionary train/val relative error, JSON), `fingerprint`
  (sha256 of names, shapes and bytes of all atoms; checked on load), and, when
  train-dict calibrated them, `sensitivity` (csrtool.calibration.calibrate: per-layer KL and
  loss curves that compress/eval use to spread a bit budget over layers).

The fingerprint covers the tensors only; load_dicts checks the metadata compress
reads (version, source.key_space, the sensitivity curves) and that every atom and
mean is finite, so an edited file is a CsrError, not a wrong result.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open

from csrtool.errors import CsrError
from csrtool.formats.stwrite import save_safetensors

FORMAT = "csrtool-dicts"
VERSION = 4  # 2: predictor maps with channel scales ([H, D + 2, D]); 3: cross-layer maps; 4: maps reading more than one layer
             # below; each written only by files that have them, else 1
KINDS = ("k", "v")
MEAN_SUFFIX = ".mean"
PMAP_SUFFIX = ".pmap"
XMAP_SUFFIX = ".xmap"
SUFFIXES = (MEAN_SUFFIX, PMAP_SUFFIX, XMAP_SUFFIX)


def dict_name(layer: int, kind: str) -> str:
    assert kind in KINDS, kind
    return f"layer.{layer}.{kind}"


def parse_dict_name(name: str) -> tuple[int, str]:
    """'layer.3.k' -> (3, 'k'): the inverse of dict_name."""
    _, layer, kind = name.split(".")
    return int(layer), kind


def fingerprint(atoms: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names, shapes and float32 bytes: identifies a dictionary set."""
    h = hashlib.sha256()
    for name in sorted(atoms):
        t = atoms[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DictSet:
    """All dictionaries of one model, with the config and data that made them."""

    atoms: dict[str, torch.Tensor]  # "layer.{l}.{k|v}" -> [G, C, N, Dc]
    config: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    fingerprint: str = ""
    sensitivity: dict = field(default_factory=dict)  # csrtool.calibration.calibrate output; {} when not calibrated
    means: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.{l}.{k|v}" -> [G, D]: subtracted before coding
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.{l}.{k|v}" -> [H, D + 2, D]: token predictor (csrtool.predictor)
    xmaps: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer.{l}.{k|v}" -> [F + 1, H·D]: cross-layer (csrtool.crosslayer)

    def get(self, layer: int, kind: str) -> torch.Tensor:
        name = dict_name(layer, kind)
        if name not in self.atoms:
            have = ", ".join(sorted(self.layers_str()))
            raise CsrError(f"the dictionary file has no dictionary for {name} (it covers layers {have}): train one with csrtool train-dict --layers")
        return self.atoms[name]

    def mean(self, layer: int, kind: str) -> torch.Tensor | None:
        """The vector subtracted before coding and added back after ([G, D]), or None (files without centring)."""
        return self.means.get(dict_name(layer, kind))

    def pmap(self, layer: int, kind: str) -> torch.Tensor | None:
        """The token predictor's map A [H, D + 2, D] (or [H, D + 1, D]; csrtool.predictor), or None."""
        return self.maps.get(dict_name(layer, kind))

    def xmap(self, layer: int, kind: str) -> torch.Tensor | None:
        """The cross-layer map W [F + 1, H·D] (csrtool.crosslayer), or None."""
        return self.xmaps.get(dict_name(layer, kind))

    @property
    def cross_layer(self) -> bool:
        """True when each layer is coded after a prediction from the decoded layer below (layers must be coded in order)."""
        return bool(self.xmaps)

    @property
    def cross_depth(self) -> int:
        """How many layers below each cross-layer prediction reads (files before the field: 1; load_dicts checks it)."""
        return cross_depth_of(self.config) if self.xmaps else 0

    @property
    def predicted(self) -> bool:
        """True when the dictionaries code what remains after the token predictor (decoding needs the model and the token ids)."""
        return bool(self.maps)

    def layers_str(self) -> set[str]:
        return {str(parse_dict_name(name)[0]) for name in self.atoms}

    @property
    def layers(self) -> list[int]:
        return sorted({parse_dict_name(name)[0] for name in self.atoms})

    @property
    def n_atoms(self) -> int:
        return next(iter(self.atoms.values())).shape[2]


def has_channel_scales(pmap: torch.Tensor) -> bool:
    """Whether a predictor map [H, D + 2, D] carries its channel scales (row D + 1); [H, D + 1, D]: a version 1 map."""
    return pmap.shape[1] == pmap.shape[2] + 2


def save_dicts(
    path: Path, atoms: dict[str, torch.Tensor], config: dict, source: dict, errors: dict, sensitivity: dict | None = None,
    means: dict[str, torch.Tensor] | None = None, maps: dict[str, torch.Tensor] | None = None,
    xmaps: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write a dictionary file atomically; returns its fingerprint (over atoms, means, predictor and cross-layer maps)."""
    both = {**atoms, **{f"{k}{suffix}": v for suffix, part in ((MEAN_SUFFIX, means), (PMAP_SUFFIX, maps), (XMAP_SUFFIX, xmaps))
                        for k, v in (part or {}).items()}}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(both.items())}
    fp = fingerprint(tensors)
    meta = {
        "format": FORMAT,
        "version": str(4 if xmaps and cross_depth_of(config) != 1 else 3 if xmaps else 2 if any(has_channel_scales(m) for m in (maps or {}).values()) else 1),
        "config": json.dumps(config, sort_keys=True),
        "source": json.dumps(source, sort_keys=True),
        "errors": json.dumps(errors, sort_keys=True),
        "fingerprint": fp,
    }
    if sensitivity:
        meta["sensitivity"] = json.dumps(sensitivity, sort_keys=True)
    save_safetensors(Path(path), tensors, meta)
    return fp


_NAME = re.compile(r"layer\.(0|[1-9][0-9]{0,5})\.[kv]")  # dict_name(layer, kind); also the sensitivity curves' keys


def _json_object(path: Path, meta: dict, key: str) -> dict:
    """Metadata `key` as a JSON object ({} when absent); CsrError naming the field otherwise."""
    try:
        val = json.loads(meta.get(key, "{}"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise CsrError(f"{path} has corrupted metadata ({key} is not JSON): re-run csrtool train-dict") from None
    if not isinstance(val, dict):
        raise CsrError(f"{path} has corrupted metadata ({key} must be a JSON object, got {type(val).__name__}): re-run csrtool train-dict")
    return val


def _no_constant(name: str) -> float:
    raise ValueError(name)


def _check_source(path: Path, source: dict) -> None:
    """The fields of `source` that compress reads: key_space, model."""
    ks = source.get("key_space", "post-rope")
    if ks not in ("pre-rope", "post-rope"):
        raise CsrError(f"{path} has corrupted metadata (source.key_space {ks!r:.40}, expected 'pre-rope' or 'post-rope'): re-run csrtool train-dict")
    if not isinstance(source.get("model", ""), (str, type(None))):
        raise CsrError(f"{path} has corrupted metadata (source.model must be a string): re-run csrtool train-dict")


def _check_sensitivity(path: Path, sens: dict) -> None:
    """The calibration curves compress --bits spends atoms by: {'curves': {'layer.L.k': [D(1), D(2), ...]}, ...}."""
    if not sens:
        return
    curves = sens.get("curves", {})
    fix = "re-run csrtool train-dict (or compress with --uniform)"
    if not isinstance(curves, dict):
        raise CsrError(f"{path} has corrupted sensitivity metadata (curves must be an object): {fix}")
    for name, curve in curves.items():
        if _NAME.fullmatch(name) is None:
            raise CsrError(f"{path} has corrupted sensitivity metadata (curve name {name[:40]!r}): {fix}")
        if not isinstance(curve, list) or not 1 <= len(curve) <= 1 << 16:
            raise CsrError(f"{path} has corrupted sensitivity metadata ({name} must be a non-empty list of numbers): {fix}")
        for v in curve:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 <= v < float("inf")):
                raise CsrError(f"{path} has corrupted sensitivity metadata ({name} holds {v!r:.40}; curves are finite numbers >= 0): {fix}")


def load_dicts(path: Path, device: str | torch.device = "cpu") -> DictSet:
    """Read and verify a dictionary file; every problem is a CsrError naming the fix."""
    path = Path(path)
    if not path.is_file():
        raise CsrError(f"dictionary file {path} not found: train one with csrtool train-dict")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CsrError(f"{path} is not a readable dictionary file ({exc}): re-run csrtool train-dict") from None
    if meta.get("format") != FORMAT:
        raise CsrError(f"{path} is not a csrtool dictionary file (format {meta.get('format')!r}): pass the output of csrtool train-dict")
    version = meta.get("version", "0")
    if not (version.isascii() and version.isdigit() and len(version) < 6):
        raise CsrError(f"{path} has a corrupted version field {version[:20]!r} (an integer is expected): re-run csrtool train-dict")
    if int(version) > VERSION:
        raise CsrError(f"{path} has dictionary format version {version}, newer than this csrtool ({VERSION}): upgrade csrtool")
    fp = fingerprint(tensors)
    if fp != meta.get("fingerprint"):
        raise CsrError(f"{path} was modified after training (fingerprint mismatch): re-run csrtool train-dict")
    config, source, errors, sensitivity = (_json_object(path, meta, k) for k in ("config", "source", "errors", "sensitivity"))
    means = {k.removesuffix(MEAN_SUFFIX): v.to(device) for k, v in tensors.items() if k.endswith(MEAN_SUFFIX)}
    maps = {k.removesuffix(PMAP_SUFFIX): v.to(device) for k, v in tensors.items() if k.endswith(PMAP_SUFFIX)}
    xmaps = {k.removesuffix(XMAP_SUFFIX): v.to(device) for k, v in tensors.items() if k.endswith(XMAP_SUFFIX)}
    atoms = {k: v.to(device) for k, v in tensors.items() if not k.endswith(SUFFIXES)}
    if not atoms:
        raise CsrError(f"{path} holds no dictionaries: re-run csrtool train-dict")
    for name, t in atoms.items():
        if _NAME.fullmatch(name) is None:
            raise CsrError(f"{path}: unexpected tensor {name[:40]!r} (expected layer.L.k / layer.L.v): re-run csrtool train-dict")
        if t.dim() != 4 or 0 in t.shape or t.shape[2] < 2:
            raise CsrError(f"{path}: dictionary {name} has shape {list(t.shape)}, expected [G, C, N >= 2, Dc]")
        m = means.get(name)
        if m is not None and tuple(m.shape) != (t.shape[0], t.shape[1] * t.shape[3]):
            raise CsrError(f"{path}: mean of {name} has shape {list(m.shape)}, expected [{t.shape[0]}, {t.shape[1] * t.shape[3]}]: re-run csrtool train-dict")
    if set(means) - set(atoms):
        raise CsrError(f"{path}: mean {sorted(set(means) - set(atoms))[0]} has no dictionary: re-run csrtool train-dict")
    if set(maps) - set(atoms):  # a map per dictionary the predictor serves (train-dict --predictor-depth: the first layers')
        raise CsrError(f"{path}: the token predictor's map {sorted(set(maps) - set(atoms))[0]} has no dictionary: re-run csrtool train-dict")
    for name, a in maps.items():
        d = atoms[name].shape[1] * atoms[name].shape[3]
        if a.dim() != 3 or a.shape[0] < 1 or tuple(a.shape[1:]) not in ((d + 1, d), (d + 2, d)):
            raise CsrError(f"{path}: predictor map of {name} has shape {list(a.shape)}, expected [H, {d + 2}, {d}]: re-run csrtool train-dict")
        if has_channel_scales(a) and not bool((a[:, -1] > 0).all()):
            raise CsrError(f"{path}: predictor map of {name} has channel scales that are not positive: re-run csrtool train-dict")
    _check_xmaps(path, atoms, xmaps, source, config)
    if len({a.shape[0] for a in maps.values()}) > 1:
        raise CsrError(f"{path}: predictor maps have different head counts: re-run csrtool train-dict")
    every = {**atoms, **{k + suffix: v for suffix, part in ((MEAN_SUFFIX, means), (PMAP_SUFFIX, maps), (XMAP_SUFFIX, xmaps)) for k, v in part.items()}}
    for name, t in sorted(every.items()):
        if not bool(torch.isfinite(t).all()):
            raise CsrError(f"{path}: {name} contains NaN or Inf values: re-run csrtool train-dict")
    if len({t.shape[2] for t in atoms.values()}) != 1:
        raise CsrError(f"{path}: dictionaries have different atom counts: re-run csrtool train-dict")
    _check_source(path, source)
    _check_sensitivity(path, sensitivity)
    return DictSet(atoms=atoms, config=config, source=source, errors=errors, fingerprint=fp, sensitivity=sensitivity, means=means, maps=maps,
                   xmaps=xmaps)


def cross_depth_of(config: dict):
    """The layers below each cross-layer prediction reads, as a training config records it (files before the field: 1)."""
    return config.get("cross_depth", 1)


def _check_xmaps(path: Path, atoms: dict[str, torch.Tensor], xmaps: dict[str, torch.Tensor], source: dict, config: dict) -> None:
    """Cross-layer maps: one for every dictionary (each layer's prediction reads the ones below), of the shape its inputs need."""
    if not xmaps:
        return
    from csrtool.crosslayer import inputs, width
    from csrtool.engine.neuraldict import MAX_CROSS_DEPTH

    depth = cross_depth_of(config)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_CROSS_DEPTH:
        raise CsrError(f"{path} has a corrupted config (cross_depth {depth!r:.20}, layers below a prediction reads: 1 to {MAX_CROSS_DEPTH}): re-run csrtool train-dict")
    want = {name for name in atoms if inputs(*parse_dict_name(name), depth)}  # all but layer 0's keys, which have nothing below
    if set(xmaps) != want:
        odd = sorted(set(xmaps) ^ want)[0]
        raise CsrError(f"{path}: cross-layer maps must cover every dictionary but layer 0's keys ({odd} "
                       f"{'should have none' if odd in xmaps else 'has none'}): re-run csrtool train-dict")
    heads = source.get("num_kv_heads")
    h = heads if isinstance(heads, int) and heads > 0 else 0  # 0: the shape check below refuses every map
    for name, w in xmaps.items():
        layer, kind = parse_dict_name(name)
        d = atoms[name].shape[1] * atoms[name].shape[3]
        missing = [i for i in inputs(layer, kind, depth) if dict_name(*i) not in atoms]
        if missing:
            raise CsrError(f"{path}: {name} is predicted from layer {missing[0][0]}, which has no dictionary: re-run csrtool train-dict")
        f = width(layer, kind, h, d, depth)
        if w.dim() != 2 or not h or tuple(w.shape) != (f + 1, h * d):
            raise CsrError(f"{path}: cross-layer map of {name} has shape {list(w.shape)}, expected "
                           f"[{f + 1 if h else 'F + 1'}, {h * d if h else 'H·D'}]: re-run csrtool train-dict")
