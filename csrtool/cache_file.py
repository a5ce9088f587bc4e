"""A .csr file as a CSRCache: its codes are loaded as codes (no dense decompress), and generation continues.

    load(path, dicts, model, block=32, reference=False) -> CSRCache      (CSRCache.from_csr)

Each layer's key and value sections become: the sink tokens, one coded block (indices
in the cache's integer type, coefficients re-quantised to the file's format with the
file's per-(batch, head) scale: q·g/g rounds back to q, so the codes are the file's),
and the tail tokens as the dense window. The file's per-layer sparsities, coefficient
format, window and sink become the cache's. Keys must be coded in the dictionaries' key
space from a post-RoPE cache (what csrtool cache saves); the file's position offset
shifts the positions like left padding would.
"""

from __future__ import annotations

from pathlib import Path

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.formats.csrsection import parse_section


def _rope_fields(rope) -> dict | None:
    """The header's RoPE parameters as a dict (a dict, or an object with the same fields)."""
    if rope is None or isinstance(rope, dict):
        return rope
    return {"inv_freq": rope.inv_freq, "scaling": rope.scaling, "position_offset": rope.position_offset}


def load(path: Path, dicts, model, block: int, reference: bool = False):
    from csrtool.cache import CSRCache, _setting
    from csrtool.formats.csrfile import open_csr

    reader = open_csr(Path(path))
    reader.check_dicts(dicts)
    hd = reader.header
    cfg = hd.config
    if hd.cache_key_space != "post-rope":
        raise CsrError(f"{path} holds keys saved {hd.cache_key_space}; CSRCache needs a cache saved post-RoPE (csrtool cache)")
    if hd.key_space != dicts.source.get("key_space", "post-rope"):
        raise CsrError(f"{path} codes keys {hd.key_space} but the dictionaries say {dicts.source.get('key_space')}: pass the dictionaries used by compress")
    setting = _setting(dicts, model, None, cfg.coef, cfg.method, True, (cfg.sparsity_k, cfg.sparsity_v))
    rope = _rope_fields(hd.rope)
    if rope is not None:
        setting.rope_info = {"inv_freq": list(rope["inv_freq"]), "scaling": rope["scaling"]}
    cache = CSRCache(setting, model, cfg.window, cfg.sink, block, reference)
    if len(hd.layers) != len(cache.layers):
        raise CsrError(f"{path} has {len(hd.layers)} layers but the model has {len(cache.layers)}: pass the model the cache was saved from")
    from csrtool.cache import CSRLayer

    if not all(isinstance(x, CSRLayer) for x in cache.layers):
        raise CsrError("resuming from a .csr file is not supported for models with sliding-window layers: start from the prompt")
    offset = int((rope or {}).get("position_offset", 0))
    dev, dtype = model.device, next(model.parameters()).dtype
    for i, kb, vb in reader.sections():
        layer = cache.layers[i]
        layer.k.sparsity, layer.v.sparsity = cfg.for_layer(i).sparsity_k, cfg.for_layer(i).sparsity_v  # the file's plan
        sk, sv = hd.shapes(i)
        s, tc, _ = codec.spans(sk[2], cfg.window, cfg.sink)
        verb = []
        for side, buf, shape in ((layer.k, kb, sk), (layer.v, vb, sv)):
            n, c, sp = side.atoms.shape[2], side.atoms.shape[1], side.sparsity
            try:
                sec = parse_section(buf, shape, n, c, sp, cfg.coef, cfg.window, hd.torch_dtype, cfg.sink)
            except CsrError as exc:
                raise CsrError(f"{path} layer {i}: {exc}") from None
            idx, tail = sec.idx, sec.verbatim
            cf = codec.dequantize_codes(sec.q, sec.g, sec.v, cfg.coef, tuple(sec.idx.shape))
            if tc:
                side.put(idx.to(dev), cf.to(dev))
            verb.append(tail.to(dev, dtype))
        b = sk[0]
        layer.is_initialized = True
        layer.dtype, layer.device = dtype, dev
        layer.sink_k, layer.sink_v = verb[0][:, :, :s], verb[1][:, :, :s]
        layer.keys, layer.values = verb[0][:, :, s:].contiguous(), verb[1][:, :, s:].contiguous()
        layer.tokens = sk[2]
        layer.pad = torch.full((b,), -offset, dtype=torch.int64, device=dev)
    return cache
