"""A .csr file as a CSRCache and back: its codes are loaded as codes (no dense decompress), and a
live cache is written as a normal .csr file (csrtool inspect, decompress and from_csr read it).

    load(path, dicts, model, block=32, reference=False) -> CSRCache      (CSRCache.from_csr)
    save(cache, path, model_name=None) -> bytes written                  (CSRCache.save)

Loading: each layer's key and value sections become: the sink tokens, one coded block (indices
in the cache's integer type, coefficients re-quantised to the file's format with the
file's per-(batch, head) scale: q·g/g rounds back to q, so the codes are the file's),
and the tail tokens as the dense window. The file's per-layer sparsities, coefficient
format, window and sink become the cache's. Keys must be coded in the dictionaries' key
space from a post-RoPE cache (what csrtool cache saves); the file's position offset
shifts the positions like left padding would.

Saving: the file's layout is sink, coded tokens, then exactly `window` tail tokens
(codec.spans), and the live tail holds up to block - 1 more: those are coded first, by the
layer's own `age` with block 1 (so the cache itself moves on: continuing with it or with
the file gives the same tokens). The sections are built from the codes held, never coded
again; but a live cache has one coefficient scale per coded block and a section one per
(batch, head), so the coefficients are dequantised and quantised once more
(codec.quantized_section): a second rounding, exact for fp16 (its scale is 1 unless a
coefficient exceeds 32768), within fp8's / int8's step otherwise. The header is the one
compress writes for a post-RoPE cache of these tokens (csrfile.make_header), with the token ids
for dictionaries trained with the token predictor (loading reads them back into the cache).
"""

from __future__ import annotations

from pathlib import Path

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.formats.csrsection import parse_section


def load(path: Path, dicts, model, block: int, reference: bool = False, tokenizer=None):
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
    if cfg.adaptive:
        raise CsrError(f"{path} holds adaptive codes (per-vector atom counts); CSRCache holds S atoms per vector: "
                       "compress the cache with --fixed to resume generation from it")
    setting = _setting(dicts, model, None, cfg.coef, cfg.method, True, (cfg.sparsity_k, cfg.sparsity_v), tokenizer)
    if hd.rope is not None:  # the file's rotations (per layer where they differ); its position offset is the layers' pad
        setting.rope_info = {k: v for k, v in hd.rope.to_json().items() if k != "position_offset"}
    cache = CSRCache(setting, model, cfg.window, cfg.sink, block, reference)
    if len(hd.layers) != len(cache.layers):
        raise CsrError(f"{path} has {len(hd.layers)} layers but the model has {len(cache.layers)}: pass the model the cache was saved from")
    from csrtool.cache import CSRLayer

    if not all(isinstance(x, CSRLayer) for x in cache.layers):
        raise CsrError("resuming from a .csr file is not supported for models with sliding-window layers: start from the prompt")
    offset = 0 if hd.rope is None else hd.rope.position_offset
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
                sec = parse_section(buf, shape, n, c, sp, side.fmt, cfg.window, hd.torch_dtype, cfg.sink)
            except CsrError as exc:
                raise CsrError(f"{path} layer {i}: {exc}") from None
            idx, tail = sec.idx, sec.verbatim
            cf = codec.dequantize_codes(sec.q, sec.g, sec.v, side.fmt, tuple(sec.idx.shape))
            if tc:
                side.put(idx.to(dev), cf.to(dev))
            verb.append(tail.to(dev, dtype))
        layer.is_initialized = True
        layer.dtype, layer.device = dtype, dev
        layer.sink_k, layer.sink_v = verb[0][:, :, :s], verb[1][:, :, :s]
        layer.keys, layer.values = verb[0][:, :, s:].contiguous(), verb[1][:, :, s:].contiguous()
        layer.tokens = sk[2]
        layer.offset = -offset  # the positions before any mask, and kept when the mask is learnt (CSRLayer.pads)
    if cache.predictions is not None:  # token-predictor dictionaries: the file's token ids (its header keeps them)
        from csrtool.predictor import cache_ids

        b = hd.layers[0][0]
        cache.predictions.set_ids(cache_ids(hd.meta, b, cache.layers[0].tokens, setting.predictor.vocab))
    return cache


def save(cache, path: Path, model_name: str | None = None) -> int:
    """Write `cache` (a CSRCache holding tokens) to `path` atomically; returns the file's size (see the module doc)."""
    from csrtool.formats import csrfile

    offset = _check_savable(cache)
    for layer in cache.layers:
        layer.age(1)  # the tail tokens older than the window are coded now: the file holds exactly `window` of them
    header = _header(cache, offset, model_name)
    st = cache.setting

    def sections():
        for i, layer in enumerate(cache.layers):
            sides = ((layer.k, layer.sink_k, layer.keys), (layer.v, layer.sink_v, layer.values))
            parts = [_section(side, sink, tail, side.fmt) for side, sink, tail in sides]
            for part, (side, _, _) in zip(parts, sides):
                if not codec.finite_coefficients(part, side.fmt):
                    raise CsrError(f"layer {i}: the cache holds non-finite coefficients; it cannot be saved")
            yield csrfile.layer_bytes(header, i, *parts)

    return csrfile.write_csr(Path(path), header, sections())


def _check_savable(cache) -> int:
    """The file's position offset (one for the batch), or CsrError saying why the cache cannot be written."""
    from csrtool.cache import CSRLayer

    if not all(isinstance(x, CSRLayer) for x in cache.layers):
        raise CsrError(
            f"{type(cache.model).__name__} has sliding-window layers, which CSRCache keeps dense and a .csr file cannot hold: "
            "saving (and resuming) works for models whose layers all use full attention"
        )
    first = cache.layers[0]
    if not first.is_initialized or first.tokens == 0:
        raise CsrError("the cache holds no tokens yet: run the prompt (model.generate) through it before saving it")
    pads = sorted({int(p) - first.offset for p in first.pads().tolist()})
    if len(pads) > 1:
        raise CsrError(
            f"the batch's sequences have different left padding ({pads[0]}..{pads[-1]} tokens) but a .csr file has one "
            "position offset for all of them: save each sequence from its own cache (generate without padding)"
        )
    if pads[0] > 0:
        raise CsrError(
            f"every sequence starts with {pads[0]} padding tokens, which a .csr file cannot mark as padding: "
            "generate without padding (or with at least one unpadded sequence) before saving"
        )
    return -first.offset - pads[0]  # pads[0] is 0 here: the offset a resumed file brought, else 0


def _header(cache, offset: int, model_name: str | None):
    """The header compress writes for these tokens (a post-RoPE cache), from shape-only tensors."""
    from csrtool.formats import csrfile
    from csrtool.formats.kvcache import KVCache

    st = cache.setting
    keys, values, plan = [], [], []
    for layer in cache.layers:
        b, h, _, dk = layer.keys.shape
        keys.append(torch.empty(b, h, layer.tokens, dk, dtype=layer.keys.dtype, device="meta"))
        values.append(torch.empty(b, h, layer.tokens, layer.values.shape[3], dtype=layer.values.dtype, device="meta"))
        plan.append((layer.k.sparsity, layer.v.sparsity))
    cfg = codec.CodecConfig(
        max(p[0] for p in plan), max(p[1] for p in plan), st.coef, st.method, cache.window, cache.sink,
        layer_sparsity=None if len(set(plan)) == 1 else tuple(plan),
    )
    if model_name is None:
        model_name = getattr(cache.model, "name_or_path", None) or None
    meta = {
        "model": model_name, "dtype": codec.DTYPE_NAMES.get(keys[0].dtype, str(keys[0].dtype)), "key_space": "post-rope",
        "rope": st.rope_info, "position_offset": offset, "tokens": cache.layers[0].tokens, "source": "CSRCache.save",
    }
    if cache.predictions is not None:  # the token predictor's input: decoding needs the ids (make_header keeps them for these dictionaries)
        meta["ids"] = cache.predictions.ids_list()
    return csrfile.make_header(KVCache(keys, values, meta), st.dicts, cfg)


def _section(side, sink: torch.Tensor, tail: torch.Tensor, coef: str) -> codec.SectionCodes:
    """One side's section from the codes held (coefficients quantised again, one scale per (b, h))."""
    if side.tokens:
        idx, cf = side.idx, side.coefficients()
    else:
        idx, cf = codec.no_codes(*tail.shape[:2], side.atoms.shape[1], side.sparsity)
    return codec.quantized_section(idx, cf, torch.cat([sink, tail], 2), coef)
