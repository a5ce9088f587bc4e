"""Keys between the cache's key space and the dictionary's: RoPE parameters and the rotation.

    RopeParams(inv_freq, scaling, position_offset, layers)   frozen, validated; from_meta (cache), from_json (.csr header)
    RopeParams.for_layer(i) -> the rotation of layer i (its override in `layers`, else the common one)
    to_code_space(k, key_space, cache_key_space, rope_p) -> keys in the dictionary's space (float32)
    from_code_space(...)                               its inverse

Models whose layers rotate differently (Gemma 3: theta 10,000 on sliding layers, 1,000,000 on
full ones) carry the common rotation in inv_freq/scaling and the others in `layers`, a list of
{'layer': i, 'inv_freq': [...], 'scaling': s} in increasing layer order (JSON; models.rope_info).

Every value is range-checked, so an edited cache meta or .csr header is a CsrError
naming the field, never a non-finite key or a traceback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csrtool.engine import rope
from csrtool.errors import CsrError

MAX_POSITION = (1 << 31) - 1
_SCALING_RANGE = (1e-3, 1e3)
_INV_FREQ_MAX = 1e4
MAX_LAYER = (1 << 31) - 1


def _finite_number(val: object, what: str, lo: float, hi: float) -> float:
    """A finite float in [lo, hi] from a JSON/meta value (int or float, not bool), or CsrError naming `what`."""
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise CsrError(f"{what} must be a number, got {val!r:.40}")
    try:
        f = float(val)
    except OverflowError:
        f = math.inf
    if not (math.isfinite(f) and lo <= f <= hi):
        raise CsrError(f"{what} must be a finite number in [{lo:g}, {hi:g}], got {val!r:.40}")
    return f


@dataclass(frozen=True)
class RopeParams:
    """The rotation that maps keys between the pre- and post-RoPE spaces (engine/rope.py): `inv_freq` [D/2]
    (0 <= f <= 1e4), `scaling` (1e-3..1e3, yarn's attention factor) and the position of the first token.
    `layers`: (layer, inv_freq, scaling) of the layers that rotate otherwise, in increasing layer order."""

    inv_freq: tuple[float, ...]
    scaling: float = 1.0
    position_offset: int = 0
    layers: tuple[tuple[int, tuple[float, ...], float], ...] = ()

    def __post_init__(self) -> None:
        _check_rotation(self.inv_freq, self.scaling, "rope", None)
        off = self.position_offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= MAX_POSITION:
            raise CsrError(f"rope position_offset must be an integer in [0, {MAX_POSITION}], got {off!r:.40}")
        if not isinstance(self.layers, tuple):
            raise CsrError(f"rope.layers must be a list, got {self.layers!r:.40}")
        prev = -1
        for j, entry in enumerate(self.layers):
            what = f"rope.layers[{j}]"
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise CsrError(f"{what} must be (layer, inv_freq, scaling), got {entry!r:.40}")
            layer, inv, scaling = entry
            if isinstance(layer, bool) or not isinstance(layer, int) or not prev < layer <= MAX_LAYER:
                raise CsrError(f"{what}.layer must be an integer in [{prev + 1}, {MAX_LAYER}] (increasing, no repeats), got {layer!r:.40}")
            _check_rotation(inv, scaling, what, len(self.inv_freq))
            prev = layer

    @classmethod
    def from_json(cls, obj: object, where: str = "rope") -> "RopeParams":
        """From {'inv_freq': [...], 'scaling': s, 'position_offset': p, 'layers': [...] (optional)} (a .csr header's
        `rope`), or CsrError."""
        if not isinstance(obj, dict):
            raise CsrError(f"{where} must be an object with inv_freq, scaling and position_offset, got {type(obj).__name__}")
        inv, scaling = _rotation_json(obj, where)
        layers = obj.get("layers", [])
        if not isinstance(layers, list):
            raise CsrError(f"{where}.layers must be a list of {{layer, inv_freq, scaling}} objects, got {layers!r:.40}")
        rows = []
        for j, row in enumerate(layers):
            what = f"{where}.layers[{j}]"
            if not isinstance(row, dict):
                raise CsrError(f"{what} must be an object with layer, inv_freq and scaling, got {row!r:.40}")
            layer = row.get("layer")
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= MAX_LAYER:
                raise CsrError(f"{what}.layer must be an integer in [0, {MAX_LAYER}], got {layer!r:.40}")
            if rows and layer <= rows[-1][0]:
                raise CsrError(f"{what}.layer must be greater than the layer before it ({rows[-1][0]}), got {layer}")
            row_inv, row_scaling = _rotation_json(row, what)
            if len(row_inv) != len(inv):
                raise CsrError(f"{what}.inv_freq has {len(row_inv)} entries but {where}.inv_freq has {len(inv)}: every layer has the same head_dim")
            rows.append((layer, row_inv, row_scaling))
        return cls(inv, scaling, _offset(obj.get("position_offset", 0), f"{where}.position_offset"), tuple(rows))

    @classmethod
    def from_meta(cls, meta: object) -> "RopeParams":
        """From a cache's meta (`rope` = {'inv_freq', 'scaling', 'layers'?}, `position_offset`), or CsrError naming the fix."""
        info = meta.get("rope") if isinstance(meta, dict) else None
        if not isinstance(info, dict) or "inv_freq" not in info:
            raise CsrError(
                "the dictionary codes keys before RoPE but the cache carries no RoPE parameters (meta.rope): "
                "save the cache with csrtool cache, or use a dictionary trained on post-RoPE keys"
            )
        try:
            offset = _offset(meta.get("position_offset") or 0, "cache meta.position_offset")
            return cls.from_json({**info, "position_offset": offset}, "cache meta.rope")
        except CsrError as exc:
            raise CsrError(f"{exc}: save the cache again with csrtool cache") from None

    def to_json(self) -> dict:
        """The header's `rope`; `layers` only when some layer rotates otherwise (older files stay byte-identical)."""
        obj = {"inv_freq": list(self.inv_freq), "scaling": self.scaling, "position_offset": self.position_offset}
        if self.layers:
            obj["layers"] = [{"layer": i, "inv_freq": list(inv), "scaling": sc} for i, inv, sc in self.layers]
        return obj

    def for_layer(self, layer: int) -> "RopeParams":
        """Layer `layer`'s own rotation (no per-layer part): its entry in `layers`, else the common one."""
        for i, inv, sc in self.layers:
            if i == layer:
                return RopeParams(inv, sc, self.position_offset)
        return RopeParams(self.inv_freq, self.scaling, self.position_offset) if self.layers else self

    def check_layers(self, n_layers: int, where: str = "rope") -> None:
        """CsrError unless every per-layer entry names one of the n_layers layers."""
        for j, (layer, _, _) in enumerate(self.layers):
            if layer >= n_layers:
                raise CsrError(f"{where}.layers[{j}].layer is {layer} but there are only {n_layers} layers")

    def shifted(self, s: int) -> "RopeParams":
        """The same rotation for tokens that start s positions later."""
        return RopeParams(self.inv_freq, self.scaling, self.position_offset + s, self.layers)

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(t, device=device, dtype=torch.float32) + self.position_offset

    def inv_freq_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)


def _check_rotation(inv_freq: object, scaling: object, what: str, length: int | None) -> None:
    """CsrError unless inv_freq is a non-empty tuple of numbers in range (of `length` entries) and scaling is in range."""
    if not isinstance(inv_freq, tuple) or not inv_freq:
        raise CsrError(f"{what}.inv_freq must be a non-empty list of numbers, got {inv_freq!r:.40}")
    if length is not None and len(inv_freq) != length:
        raise CsrError(f"{what}.inv_freq has {len(inv_freq)} entries but rope.inv_freq has {length}: every layer has the same head_dim")
    for i, f in enumerate(inv_freq):
        _finite_number(f, f"{what}.inv_freq[{i}]", 0.0, _INV_FREQ_MAX)
    _finite_number(scaling, f"{what}.scaling", *_SCALING_RANGE)


def _rotation_json(obj: dict, where: str) -> tuple[tuple[float, ...], float]:
    """(inv_freq, scaling) of a JSON object, or CsrError naming the field."""
    inv = obj.get("inv_freq")
    if not isinstance(inv, list):
        raise CsrError(f"{where}.inv_freq must be a list of numbers, got {inv!r:.40}")
    return (
        tuple(_finite_number(f, f"{where}.inv_freq[{i}]", 0.0, _INV_FREQ_MAX) for i, f in enumerate(inv)),
        _finite_number(obj.get("scaling", 1.0), f"{where}.scaling", *_SCALING_RANGE),
    )


def _offset(val: object, what: str) -> int:
    if isinstance(val, float) and val.is_integer():
        val = int(val)
    if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val <= MAX_POSITION:
        raise CsrError(f"{what} must be an integer in [0, {MAX_POSITION}], got {val!r:.40}")
    return val


def to_code_space(k: torch.Tensor, key_space: str, cache_key_space: str, rope_p: RopeParams | None) -> torch.Tensor:
    """Keys [B, H, T, D] from the cache's key space to the dictionary's (float32)."""
    return _move(k, key_space != "pre-rope", key_space, cache_key_space, rope_p)


def from_code_space(k: torch.Tensor, key_space: str, cache_key_space: str, rope_p: RopeParams | None) -> torch.Tensor:
    """Inverse of to_code_space (float32)."""
    return _move(k, key_space == "pre-rope", key_space, cache_key_space, rope_p)


def _move(k: torch.Tensor, forward: bool, key_space: str, cache_key_space: str, rope_p: RopeParams | None) -> torch.Tensor:
    """k [B, H, T, D] as float32, rotated to its positions (forward) or back, unless the two spaces agree."""
    kf = k.to(torch.float32)
    if key_space == cache_key_space:
        return kf
    assert rope_p is not None and not rope_p.layers, "pass the layer's own rotation (RopeParams.for_layer)"
    if len(rope_p.inv_freq) * 2 != k.shape[-1]:
        raise CsrError(f"RoPE parameters cover {len(rope_p.inv_freq) * 2} channels but keys have {k.shape[-1]}: the cache meta is inconsistent")
    fn = rope.rotate if forward else rope.unrotate
    return fn(kf, rope_p.positions(k.shape[2], k.device), rope_p.inv_freq_tensor(k.device), rope_p.scaling)
