"""Token predictor: the part of a key or value that the token alone decides, subtracted before coding.

A layer's key or value vector is largely a function of its token, most of all in the early
layers; the dictionaries' atoms learn the tokens of the calibration text and code the others
badly (docs/quality.md, fifth pass). The predictor removes that part with the model itself:

    p(t) = the token's K/V at layer l when the model reads PREFIX + t (its "context-free" K/V),
           or PREFIX + the c - 1 tokens before t + t with a context of c tokens
    x ≈ [p(t), 1] · A[h]        A [H, D + 1, D] per layer and kind, least squares on calibration
    the dictionary codes x − [p(t), 1] · A[h] (and its mean), decoding adds it back, every decoder
    rounding it alike: divided by c[h] (each channel's RMS on calibration: row D + 1 of the stored map),
    each vector to int8 with a float16 absmax scale, multiplied back by c[h]

The maps are stored in the dictionary file (`layer.{l}.{k|v}.pmap`: [H, D + 2, D], A and c); p(t) costs no bits, since
whoever decodes has the token ids and the model. Keys are predicted in the dictionaries' key
space (pre-RoPE: p is taken at the prefix's next position and un-rotated, as collect does).

    TokenPredictor(model, tokenizer, key_space, rope_params)   memoised per token id
    TokenPredictor.for_model(loaded, key_space)        models.Loaded; keeps it as .loaded
    TokenPredictor.for_dicts(loaded, dicts)           the one a dictionary file was trained with
    TokenPredictor.of_dicts(model, tokenizer, dicts)  the same from a model and its tokenizer
    TokenPredictor.kv(layer, kind, ids [T], last=None) -> p [T or last, H, D] float32
    TokenPredictor.compute(keys) -> per model pass: (keys, {kind: per layer [n, H, D]})   unmemoised (the live cache's)
    fit_map(x [T, H, D], p [T, H, D]) -> A [H, D + 1, D]
    fit_prediction(x, p) -> (A with c [H, D + 2, D], what coding subtracts [T, H, D])   train-dict's fit
    apply_map(p [T, H, D], A) -> [H, T, D]              float32, rounded as above (quantize_prediction)
    raw_map(p, A) -> (int8 [H, T, D], scale float16 [H, T])   the same before c, as a live cache holds it
    map_channels(A) -> c [H, D] | None                  None: a map of csrtool before c (rounded without it)
    offset(dicts, predictor, layer, kind, ids [B, T], t) -> [B, H, t, D]   what coding subtracts from the last t: mean + prediction
    cache_ids(meta, b, t, vocab) -> ids [B, T]     a saved cache's token ids (meta["ids"], csrtool cache writes them)
    collection_ids(reader) -> ids [T]              an activation set's token ids, checked usable for training (pre-RoPE keys)
"""

from __future__ import annotations

from typing import Iterator

import torch

from csrtool.attention_hook import suspended
from csrtool.collect import capture_kv, key_rope
from csrtool.errors import CsrError
from csrtool.formats.dicts import has_channel_scales

PREFIX_TEXT = "\n"  # read before each token: a token at position 0 is an attention sink, not a typical token
BATCH = 256  # prefix + token pairs per forward pass
MAX_CONTEXT = 8  # tokens a prediction may read (distinct keys grow fast with it)
RIDGE = 1e-4  # relative ridge of the least-squares fit (keeps rare directions of p from blowing up)


class TokenPredictor:
    """The context-free K/V of tokens under one model, computed once per distinct key.

    With `context` c, the key of position i is its token and the c - 1 before it (PREFIX_TEXT's token
    stands in for those before the sequence); the model reads PREFIX + key and the last position's
    K/V is the prediction. c = 1: the token alone; c = 2: the token after its predecessor."""

    def __init__(self, model, tokenizer, key_space: str, rope_params: dict | None, context: int = 1):
        if not isinstance(context, int) or isinstance(context, bool) or not 1 <= context <= MAX_CONTEXT:
            raise CsrError(f"the token predictor's context must be 1 to {MAX_CONTEXT} tokens, got {context!r}")
        self.model = model
        self.key_space = key_space
        self.rope_params = rope_params
        self.context = context
        enc = tokenizer(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
        self.prefix = int(enc[-1])
        self.vocab = int(model.get_input_embeddings().weight.shape[0])
        self.index: dict[tuple[int, ...], int] = {}  # key -> row of the tables
        self.tables: dict[str, list[torch.Tensor]] = {}  # kind -> per layer [capacity, H, D] float32 (CPU); rows < len(index) used
        self.loaded = None  # the models.Loaded it came from (for_model)

    @classmethod
    def for_model(cls, loaded, key_space: str, context: int = 1) -> "TokenPredictor":
        tp = cls(loaded.model, loaded.tokenizer, key_space, key_rope(loaded.model, key_space), context)
        tp.loaded = loaded
        return tp

    @classmethod
    def for_dicts(cls, loaded, dicts) -> "TokenPredictor":
        """The predictor a dictionary file was trained with (its source: key space, context); keeps `loaded` as .loaded."""
        tp = cls.of_dicts(loaded.model, loaded.tokenizer, dicts)
        tp.loaded = loaded
        return tp

    @classmethod
    def of_dicts(cls, model, tokenizer, dicts) -> "TokenPredictor":
        """for_dicts for a model and tokenizer held apart (a live cache's)."""
        key_space, context = cls.setting(dicts)
        return cls(model, tokenizer, key_space, key_rope(model, key_space), context)

    @staticmethod
    def setting(dicts) -> tuple[str, int]:
        """(key space, context) of the predictor a dictionary file was trained with: files alike in it share one."""
        return dicts.source.get("key_space", "post-rope"), int(dicts.source.get("predictor_context", 1))

    def keys(self, ids: torch.Tensor, last: int | None = None) -> list[tuple[int, ...]]:
        """The key of each position of ids [T] (of the `last` ones only): its token and the context - 1 before it."""
        flat = ids.reshape(-1)
        n = flat.numel() if last is None else last
        lo = flat.numel() - n  # the first wanted position
        start = max(0, lo - self.context + 1)  # the first token its key reads
        padded = [self.prefix] * (self.context - 1 - (lo - start)) + [int(i) for i in flat[start:].tolist()]
        return [tuple(padded[i : i + self.context]) for i in range(n)]

    def _store(self, kind: str, rows: list[torch.Tensor], at: int) -> None:
        """Write rows (per layer [n, H, D]) at row `at` of the tables (store_rows)."""
        tables = self.tables.setdefault(kind, [None] * len(rows))
        for i, r in enumerate(rows):
            tables[i] = store_rows(tables[i], r, at, 0)

    def compute(self, keys: list[tuple[int, ...]]) -> Iterator[tuple[list[tuple[int, ...]], dict[str, list[torch.Tensor]]]]:
        """The context-free K/V of `keys`, BATCH keys per model pass: (those keys, {kind: per layer [n, H, D] float32
        on the model's device}) per pass; nothing is stored."""
        dev = next(self.model.parameters()).device
        for lo in range(0, len(keys), BATCH):
            part = torch.tensor(keys[lo : lo + BATCH], dtype=torch.long, device=dev)  # [n, context]
            batch = torch.cat([torch.full_like(part[:, :1], self.prefix), part], 1)
            with torch.no_grad(), suspended(self.model):  # may run inside eval's attention probes or a live cache: unobserved
                ks, vs = capture_kv(self.model, batch, self.key_space, self.rope_params)
            yield keys[lo : lo + BATCH], {kind: [x[:, :, -1].float() for x in xs] for kind, xs in (("k", ks), ("v", vs))}

    def _extend(self, keys: list[tuple[int, ...]]) -> None:
        new = [k for k in dict.fromkeys(keys) if k not in self.index]
        for part, kv in self.compute(new):
            for kind, xs in kv.items():
                self._store(kind, [x.cpu() for x in xs], len(self.index))  # [n, H, D] per layer
            for k in part:
                self.index[k] = len(self.index)

    def kv(self, layer: int, kind: str, ids: torch.Tensor, last: int | None = None) -> torch.Tensor:
        """p [T, H, D] float32 (CPU) for the token ids [T] of a sequence from its start (or its `last` positions only;
        their context is read from the ids before them)."""
        keys = self.keys(ids, last)
        if not keys:
            raise CsrError("the token predictor needs at least one token")
        self._extend(keys)
        rows = torch.tensor([self.index[k] for k in keys], dtype=torch.long)
        return self.tables[kind][layer][rows]


def store_rows(table: torch.Tensor | None, rows: torch.Tensor, at: int, dim: int) -> torch.Tensor:
    """`table` (None: none yet) with `rows` written at index `at` along `dim`, the rows before `at` kept; a new table
    with a quarter more capacity (at least 64, at least enough) when they do not fit. Returns the table to keep."""
    n = rows.shape[dim]
    if table is None or at + n > table.shape[dim]:
        cap = max(64, at + n, 0 if table is None else table.shape[dim] * 5 // 4)
        shape = list(rows.shape)
        shape[dim] = cap
        grown = rows.new_empty(shape)
        if table is not None:
            grown.narrow(dim, 0, at).copy_(table.narrow(dim, 0, at))
        table = grown
    table.narrow(dim, at, n).copy_(rows)
    return table


def fit_map(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Least-squares A [H, D + 1, D] with x[:, h] ≈ [p[:, h], 1] · A[h] (x, p [T, H, D]), lightly ridged."""
    t, h, d = p.shape
    ones = torch.ones(t, h, 1, dtype=torch.float64)
    f = torch.cat([p.double(), ones], 2).transpose(0, 1)  # [H, T, D + 1]
    gram = f.transpose(1, 2) @ f
    ridge = RIDGE * gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(d + 1, dtype=torch.float64)
    rhs = f.transpose(1, 2) @ x.double().transpose(0, 1)
    return torch.linalg.solve(gram + ridge, rhs).float()


def channel_scale(y: torch.Tensor) -> torch.Tensor:
    """[H, D] float32: each channel's root mean square over the predictions y [H, T, D] (calibration's), the per-channel
    scale the int8 rounding divides by first, so that a few large channels (Gemma-3's normalised keys) do not set every
    channel's step; a channel that is always 0 gets 1."""
    c = y.float().pow(2).mean(1).sqrt()
    return torch.where(c > 0, c, torch.ones_like(c))


def quantize_prediction(v: torch.Tensor, chan: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v [H, T, D] (or [..., D] without chan) -> (q int8, scale float16 [H, T]): each vector, divided by its head's channel
    scales chan [H, D] when given, to int8 with its own absmax scale, as the predictions are held and added by every
    decoder (a live cache keeps them so: about half a float16 table)."""
    if chan is not None:
        v = v / chan.to(v.device, torch.float32)[:, None, :]
    scale = (v.abs().amax(-1) / 127).half()
    s = scale.float().clamp_min(torch.finfo(torch.float16).tiny)[..., None]
    return torch.round(v / s).clamp_(-127, 127).to(torch.int8), scale


def dequantize_prediction(q: torch.Tensor, scale: torch.Tensor, chan: torch.Tensor | None = None) -> torch.Tensor:
    out = q.to(torch.float32) * scale.to(torch.float32)[..., None]
    return out if chan is None else out * chan.to(out.device, torch.float32)[:, None, :]


def exact_map(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[H, T, D] float32: [p, 1]·A[h] for p [T, H, D], before any rounding (A's rows 0..D: the linear part and the bias)."""
    d = p.shape[-1]
    a = a.to(p.device, torch.float32)
    return torch.einsum("thd,hde->hte", p, a[:, :d]) + a[:, d][:, None, :]


def map_channels(a: torch.Tensor) -> torch.Tensor | None:
    """A map's channel scales [H, D] (its row D + 1), or None for a map without them (files of csrtool before them)."""
    return a[:, -1] if has_channel_scales(a) else None


def apply_map(p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[H, T, D] float32: the predicted part of each head's vectors from p [T, H, D], as every decoder adds it:
    divided by the map's channel scales, each vector rounded to int8 with its absmax scale, multiplied back."""
    return dequantize_prediction(*raw_map(p, a), map_channels(a))


def raw_map(p: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_map's prediction as (int8 [H, T, D], scale float16 [H, T]) before the channel scales, as a live cache holds it."""
    return quantize_prediction(exact_map(p, a), map_channels(a))


def fit_prediction(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [H, D + 2, D], the prediction coding subtracts [T, H, D]) for vectors x [T, H, D] and predictor K/V p [T, H, D]:
    the least-squares map (fit_map) with its predictions' channel scales on these vectors (channel_scale) as row D + 1."""
    a = fit_map(x, p)
    y = exact_map(p, a)  # once: the channel scales and the rounding both read it
    chan = channel_scale(y)
    return torch.cat([a, chan[:, None, :]], 1), dequantize_prediction(*quantize_prediction(y, chan), chan).transpose(0, 1)


def offset(dicts, predictor: TokenPredictor, layer: int, kind: str, ids: torch.Tensor, t: int) -> torch.Tensor:
    """[B, H, t, D] float32 (H: G, the mean's heads, where nothing is predicted): the dictionary's mean plus the predicted
    part of the last t of the tokens ids [B, T] (a sequence from its start, so each prediction can read the tokens before
    it; code space)."""
    a = dicts.pmap(layer, kind)
    if a is None or t == 0:  # nothing predicted: a layer the predictor does not serve (--predictor-depth), or no token
        atoms = dicts.get(layer, kind)
        pred = torch.zeros(ids.shape[0], 1, t, atoms.shape[1] * atoms.shape[3])
    else:
        pred = torch.stack([apply_map(predictor.kv(layer, kind, row, last=t), a) for row in ids])
    mean = dicts.mean(layer, kind)
    return pred if mean is None else pred + mean.to("cpu", torch.float32)[None, :, None, :]


def cache_ids(meta: dict, b: int, t: int, vocab: int) -> torch.Tensor:
    """The token ids [B, T] a cache's meta records (`ids`: B lists of T ints below `vocab`); CsrError otherwise."""
    ids = meta.get("ids")
    fix = "save the cache with csrtool cache (it records them), or use dictionaries trained with --no-predictor"
    if ids is None:
        raise CsrError(f"the cache does not record its token ids, which the token predictor needs: {fix}")
    ok = (isinstance(ids, list) and len(ids) == b and all(isinstance(r, list) and len(r) == t for r in ids)
          and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for r in ids for i in r))
    if not ok:
        raise CsrError(f"the cache's token ids (meta.ids) are not {b} lists of {t} token ids below {vocab}: {fix}")
    return torch.tensor(ids, dtype=torch.long).reshape(b, t)


def collection_ids(reader) -> torch.Tensor:
    """The token ids [T] of an activation set (formats.acts.ActsReader) the predictor can train on; CsrError otherwise."""
    key_space = reader.manifest.get("key_space", "post-rope")
    if key_space != "pre-rope":
        raise CsrError(f"the token predictor needs keys collected before RoPE ({reader.dir} holds {key_space} keys): "
                       "re-run csrtool collect --keys pre-rope")
    ids = reader.ids()
    if ids is None:
        raise CsrError(f"{reader.dir} was collected without token ids, which --predictor needs: re-run csrtool collect")
    return ids
