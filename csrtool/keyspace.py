"""Keys between the cache's key space and the dictionary's: RoPE parameters and the rotation.

    RopeParams(inv_freq, scaling, position_offset)   frozen, validated; from_meta (cache), from_json (.csr header)
    to_code_space(k, key_space, cache_key_space, rope_p) -> keys in the dictionary's space (float32)
    from_code_space(...)                               its inverse

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
    (0 <= f <= 1e4), `scaling` (1e-3..1e3, yarn's attention factor) and the position of the first token."""

    inv_freq: tuple[float, ...]
    scaling: float = 1.0
    position_offset: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.inv_freq, tuple) or not self.inv_freq:
            raise CsrError(f"rope.inv_freq must be a non-empty list of numbers, got {self.inv_freq!r:.40}")
        for i, f in enumerate(self.inv_freq):
            _finite_number(f, f"rope.inv_freq[{i}]", 0.0, _INV_FREQ_MAX)
        _finite_number(self.scaling, "rope.scaling", *_SCALING_RANGE)
        off = self.position_offset
        if isinstance(off, bool) or not isinstance(off, int) or not 0 <= off <= MAX_POSITION:
            raise CsrError(f"rope position_offset must be an integer in [0, {MAX_POSITION}], got {off!r:.40}")

    @classmethod
    def from_json(cls, obj: object, where: str = "rope") -> "RopeParams":
        """From {'inv_freq': [...], 'scaling': s, 'position_offset': p} (a .csr header's `rope`), or CsrError."""
        if not isinstance(obj, dict):
            raise CsrError(f"{where} must be an object with inv_freq, scaling and position_offset, got {type(obj).__name__}")
        inv = obj.get("inv_freq")
        if not isinstance(inv, list):
            raise CsrError(f"{where}.inv_freq must be a list of numbers, got {inv!r:.40}")
        return cls(
            tuple(_finite_number(f, f"{where}.inv_freq[{i}]", 0.0, _INV_FREQ_MAX) for i, f in enumerate(inv)),
            _finite_number(obj.get("scaling", 1.0), f"{where}.scaling", *_SCALING_RANGE),
            _offset(obj.get("position_offset", 0), f"{where}.position_offset"),
        )

    @classmethod
    def from_meta(cls, meta: object) -> "RopeParams":
        """From a cache's meta (`rope` = {'inv_freq', 'scaling'}, `position_offset`), or CsrError naming the fix."""
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
        return {"inv_freq": list(self.inv_freq), "scaling": self.scaling, "position_offset": self.position_offset}

    def shifted(self, s: int) -> "RopeParams":
        """The same rotation for tokens that start s positions later."""
        return RopeParams(self.inv_freq, self.scaling, self.position_offset + s)

    def positions(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.arange(t, device=device, dtype=torch.float32) + self.position_offset

    def inv_freq_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.inv_freq, dtype=torch.float32, device=device)


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
    assert rope_p is not None
    if len(rope_p.inv_freq) * 2 != k.shape[-1]:
        raise CsrError(f"RoPE parameters cover {len(rope_p.inv_freq) * 2} channels but keys have {k.shape[-1]}: the cache meta is inconsistent")
    fn = rope.rotate if forward else rope.unrotate
    return fn(kf, rope_p.positions(k.shape[2], k.device), rope_p.inv_freq_tensor(k.device), rope_p.scaling)
