"""transformers' own `QuantizedCache`: what a user would pick instead of CSR today.

Backends: 'quanto' (needs optimum-quanto >= 0.2.5, 2 or 4 bits), 'hqq' (needs hqq),
'fp8' (built into transformers 5, per-tensor scale). The cache keeps the last
`residual_length` tokens in full precision and re-quantises everything when that
residual fills up, so its window varies between 0 and W tokens (ours is always W).
It has no attention-sink tokens: the eval's --sink does not apply to these rows.

Honest cost: nbits per element plus a scale and a zero point per group of
`q_group_size` elements, counted in the model's dtype.
"""

from __future__ import annotations

import torch

Q_GROUP = 64  # elements per scale/zero-point group (transformers' default)
INSTALL = {
    "quanto": "needs optimum-quanto: pip install 'optimum-quanto>=0.2.5'",
    "hqq": "needs hqq: pip install hqq",
    "fp8": "needs transformers>=5 with QuantizedCache(backend='fp8')",
}


def backend_missing(backend: str) -> str | None:
    """None when the backend can run here, else the install hint."""
    from transformers.utils import import_utils

    if backend == "quanto":
        ok = import_utils.is_optimum_quanto_available()
    elif backend == "hqq":
        ok = import_utils.is_hqq_available()
    elif backend == "fp8":
        try:
            from transformers.cache_utils import Fp8QuantizedLayer  # noqa: F401
        except ImportError:
            ok = False
        else:
            ok = True
    else:
        return f"unknown QuantizedCache backend {backend!r}"
    return None if ok else INSTALL[backend]


def prebuild() -> str | None:
    """Compile optimum-quanto's C++ extension now rather than in the first eval (it builds on first use:
    ~30 s on 2 cores). None when it is built (or quanto is not installed), else why it could not be."""
    if backend_missing("quanto"):
        return None
    try:
        from optimum.quanto.library.extensions import get_extension

        get_extension("quanto_cpp").lib
    except Exception as exc:  # a missing compiler: the eval's quanto rows fall back to quanto's Python unpacking
        return f"{type(exc).__name__}: {exc}"
    return None


def unsupported_model(model, backend: str, q_group_size: int = Q_GROUP) -> str | None:
    """None when transformers' QuantizedCache can hold this model's cache, else why not."""
    from csrtool.eval.sliding import has_sliding
    from csrtool.models import kv_shape

    if has_sliding(model):
        return f"transformers' QuantizedCache supports full-attention models only and {type(model).__name__} has sliding-window layers"
    _, heads, head_dim = kv_shape(model.config)
    if backend != "fp8" and (heads * head_dim) % q_group_size:
        # quanto groups the flattened [H, T, D] tensor: any T works only when H·D is a multiple of the group
        return f"quanto groups of {q_group_size} do not divide {heads} KV heads x head_dim {head_dim}"
    return None


class QuantizedCacheMethod:
    """A `transformers.QuantizedCache` fed chunk by chunk (no reconstruct: the cache does it)."""

    def __init__(self, backend: str, nbits: int, residual_length: int, q_group_size: int = Q_GROUP, dtype_bits: int = 32, name: str | None = None):
        self.backend = backend
        self.nbits = nbits
        self.residual_length = residual_length
        self.q_group_size = q_group_size
        self.name = name or (f"{backend}{nbits}" if backend != "fp8" else "tf-fp8")
        if backend == "fp8":
            self.bits_k = self.bits_v = 8.0  # one scale per tensor: negligible
        else:
            self.bits_k = self.bits_v = nbits + 2 * dtype_bits / q_group_size
        self.side_bits = 0

    def make_cache(self, model):
        from transformers import QuantizedCache

        if self.backend == "fp8":
            return QuantizedCache(backend="fp8", config=model.config)
        return QuantizedCache(
            backend=self.backend,
            config=model.config,
            nbits=self.nbits,
            q_group_size=self.q_group_size,
            residual_length=self.residual_length,
        )


def dtype_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits
