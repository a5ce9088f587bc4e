"""CSR as an evaluated method: exactly what compress -> decompress gives, per token batch.

Reconstruction is csrtool.reconstruct.Reconstructor's (codec.roundtrip / roundtrip_keys),
so the coefficient quantisation (codec.DEFAULT_COEF: fp8 keys, int4 values where they have few atoms) and the key space (pre- or post-RoPE,
from the dictionary file's source) are those of a .csr file.

The plan is csrtool.calibration.allocate.codec_plan's, exactly as `compress --bits` picks it:
with `bits` and calibrated dictionaries (train-dict --calibrate), per-layer sparsities;
`uniform=True` (or explicit sparsities) gives every layer the same.

Honest cost (codec.vector_bits, averaged over layers): per vector C·S·(ceil(log2 N) + coefficient bits)
plus any per-vector scale; the per-(head, batch) float32 coefficient scale a file
section adds is 32 bits per head per compressed batch of tokens (< 0.01 bit/channel
at the default chunk) and is left out. Dictionaries (and the token predictor's maps) are
side bits, counted at fp16, as are the cross-layer maps; the predictor's own input, the token ids, is what the decoder
has anyway (the model generating from the cache holds them).
"""

from __future__ import annotations

from csrtool import codec
from csrtool.calibration import allocate
from csrtool.errors import CsrError
from csrtool.formats.dicts import DictSet, parse_dict_name
from csrtool.reconstruct import Reconstructor

DICT_BITS = 16  # atoms counted at fp16


class CSR(Reconstructor):
    """Sparse codes over the file's dictionaries at a bit budget (or explicit sparsities)."""

    def __init__(
        self,
        dicts: DictSet,
        n_layers: int,
        num_kv_heads: int,
        head_dim: int,
        bits: float | None = None,
        method: str = "mp",
        coef: str = codec.DEFAULT_COEF,
        rope_info: dict | None = None,
        sparsity: tuple[int, int] | None = None,
        name: str | None = None,
        uniform: bool = False,
        adaptive: bool = False,
        predictor=None,
    ):
        if method not in codec.METHODS:
            raise CsrError(f"CSR method must be one of {', '.join(codec.METHODS)}, got {method!r}")
        config = allocate.codec_plan(
            dicts, n_layers, num_kv_heads, head_dim, bits=bits, sparsity=sparsity, coef=coef, method=method, uniform=uniform, adaptive=adaptive
        )
        super().__init__(dicts, config, rope_info, predictor)
        self.method = method
        self.coef = coef
        self.n_atoms, self.value_split = allocate.check_dicts(dicts, n_layers, num_kv_heads, head_dim)
        self.s_k, self.s_v = config.sparsity_k, config.sparsity_v
        self.layer_sparsity = config.layer_sparsity  # per-layer (s_k, s_v) from the dictionaries' sensitivity calibration
        plan = self.layer_sparsity or ((self.s_k, self.s_v),) * n_layers
        self.bits_k = sum(codec.side_bits(self.n_atoms, "k", p[0], head_dim, self.value_split, coef) for p in plan) / n_layers / head_dim
        self.bits_v = sum(codec.side_bits(self.n_atoms, "v", p[1], head_dim, self.value_split, coef) for p in plan) / n_layers / head_dim
        # the atoms, the token predictor's and the cross-layer maps (if any) of the model's layers
        self.side_bits = sum(a.numel() for tensors in (dicts.atoms, dicts.maps, dicts.xmaps) for n, a in tensors.items()
                             if parse_dict_name(n)[0] < n_layers) * DICT_BITS
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
            "adaptive": self.config.adaptive,
            "token_predictor": self.dicts.predicted,
            "cross_layer": self.dicts.cross_layer,
        }
