"""CSR as an evaluated method: exactly what compress -> decompress gives, per token batch.

Reconstruction goes through `csrtool.codec.roundtrip` / `roundtrip_keys`, so the
coefficient quantisation (fp8 by default) and the key space (pre- or post-RoPE,
from the dictionary file's source) are those of a .csr file.

With `bits` and calibrated dictionaries (train-dict --calibrate), the sparsity of
each layer comes from csrtool.calibration.allocate.plan, exactly as `compress --bits` picks it;
`uniform=True` (or explicit sparsities) gives every layer the same.

Honest cost (codec.vector_bits, averaged over layers): per vector C·S·(ceil(log2 N) + coefficient bits)
plus any per-vector scale; the per-(head, batch) float32 coefficient scale a file
section adds is 32 bits per head per compressed batch of tokens (< 0.01 bit/channel
at the default chunk) and is left out. Dictionaries are side bits, counted at fp16.
"""

from __future__ import annotations

import torch

from csrtool import codec
from csrtool.calibration import allocate
from csrtool.formats.dicts import DictSet
from csrtool.errors import CsrError

DICT_BITS = 16  # atoms counted at fp16


class CSR:
    """Sparse codes over the file's dictionaries at a bit budget (or explicit sparsities)."""

    def __init__(
        self,
        dicts: DictSet,
        n_layers: int,
        num_kv_heads: int,
        head_dim: int,
        bits: float | None = None,
        method: str = "mp",
        coef: str = "fp8",
        rope_info: dict | None = None,
        sparsity: tuple[int, int] | None = None,
        name: str | None = None,
        uniform: bool = False,
    ):
        if method not in codec.METHODS:
            raise CsrError(f"CSR method must be one of {', '.join(codec.METHODS)}, got {method!r}")
        self.dicts = dicts
        self.method = method
        self.coef = coef
        self.config = allocate.codec_plan(
            dicts, n_layers, num_kv_heads, head_dim, bits=bits, sparsity=sparsity, coef=coef, method=method, uniform=uniform
        )
        self.n_atoms, self.value_split = allocate.check_dicts(dicts, n_layers, num_kv_heads, head_dim)
        self.key_space = dicts.source.get("key_space", "post-rope")
        if self.key_space not in codec.KEY_SPACES:
            raise CsrError(f"the dictionary file has unknown key_space {self.key_space!r}: re-run csrtool train-dict")
        if self.key_space == "pre-rope" and rope_info is None:
            raise CsrError("the dictionaries code keys before RoPE but this model has no fixed RoPE to undo: use post-RoPE dictionaries")
        self.rope_info = rope_info
        self.s_k, self.s_v = self.config.sparsity_k, self.config.sparsity_v
        self.layer_sparsity = self.config.layer_sparsity  # per-layer (s_k, s_v) from the dictionaries' sensitivity calibration
        plan = self.layer_sparsity or ((self.s_k, self.s_v),) * n_layers
        self.bits_k = sum(codec.vector_bits(self.n_atoms, p[0], 1, coef) for p in plan) / n_layers / head_dim
        self.bits_v = sum(codec.vector_bits(self.n_atoms, p[1], self.value_split, coef) for p in plan) / n_layers / head_dim
        self.side_bits = sum(a.numel() for n, a in dicts.atoms.items() if int(n.split(".")[1]) < n_layers) * DICT_BITS
        label = f"{bits:g}b" if bits is not None else f"s{self.s_k}/{self.s_v}"
        self.name = name or f"csr-{method}-{label}"
        self.target_bits = bits

    def describe(self) -> dict:
        return {
            "n_atoms": self.n_atoms,
            "sparsity_k": self.s_k,
            "sparsity_v": self.s_v,
            "value_split": self.value_split,
            "coef": self.coef,
            "solver": self.method,
            "key_space": self.key_space,
            "target_bits": self.target_bits,
            "layer_sparsity": None if self.layer_sparsity is None else [list(p) for p in self.layer_sparsity],
        }

    def sparsity(self, layer: int) -> tuple[int, int]:
        return self.layer_sparsity[layer] if self.layer_sparsity is not None else (self.s_k, self.s_v)

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        atoms = self.dicts.get(layer, kind).to(x.device)
        mean = self.dicts.mean(layer, kind)
        s_k, s_v = self.sparsity(layer)
        if kind == "v" or self.key_space == "post-rope":
            return codec.roundtrip(x, atoms, s_v if kind == "v" else s_k, self.coef, self.method, mean)
        first = int(positions[0])
        assert bool((positions == torch.arange(first, first + x.shape[2], device=positions.device)).all())
        return codec.roundtrip_keys(
            x, atoms, s_k, self.coef, self.method,
            positions_offset=first, rope_info=self.rope_info,
            key_space=self.key_space, cache_key_space="post-rope", mean=mean,
        )
