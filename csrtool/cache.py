"""CSRCache: a transformers cache that holds old tokens as sparse codes, for `model.generate`.

    cache = CSRCache.from_dicts(dicts, model, bits=1.0)      # window, sink, block, coef, method
    out = model.generate(**inputs, past_key_values=cache)
    cache.nbytes() -> {"codes", "dense", "dicts", "total"}
    cache.save("out.csr"); CSRCache.from_csr("out.csr", dicts, model)   # a .csr file and back (cache_file)

Each layer (CSRLayer, modelled on transformers' QuantizedLayer and its residual buffer)
holds: the first `sink` tokens dense, the coded tokens (indices in the smallest integer
type that holds N, or split-packed where that type wastes > 25% (packs_indices);
coefficients in the .csr's format with its per-(batch, head) float32 scale per coded block), and a dense tail: the last `window` tokens plus at most `block`-1
tokens waiting to be coded. Right after a step's attention (cache_attention calls
`age`), tail tokens older than the window are coded in one call once there are `block`
of them. A prompt is attended dense, as `eval` attends its chunks, and coded at the end
of its own prefill step, so prefill pays for coding it and decoding starts with the
codes ready. With block=1 the schedule is exactly eval's CompressedFeed.age.

The codes are made by the functions `compress --bits` and `eval` use (codec.encode_codes,
codec.quantize_codes, codec.to_code_space with the token's real position, the
dictionary's mean subtracted) under the per-layer plan of eval's CSR method
(calibration.allocate.plan); `_setting` is the one place that picks it.

Attention on the codes goes through cache_attention (an attention implementation
registered with transformers while the cache is open): the layer's update returns
only its dense tail, marked with the layer, and the attention function reads the
codes and the sink from the layer (engine.attention.attend, or attend_reference
with reference=True).

Shapes: B batch, H KV heads, T tokens, D head_dim, C channel chunks, S atoms per chunk.
Slots are cache positions shared by the batch; with left padding, sequence b's
position at slot s is s - pad[b] (generate's cumsum(mask) - 1).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from csrtool import codec
from csrtool.engine import packing
from csrtool.engine import rope as _rope
from csrtool.engine.attention import Codes, Rope
from csrtool.errors import CsrError

DEFAULT_BLOCK = 32  # tokens coded per call during decoding (the dense tail holds window .. window + block - 1)


def index_dtype(n_atoms: int) -> torch.dtype:
    """Smallest integer dtype the engine reads that holds indices < n_atoms."""
    if n_atoms <= 256:
        return torch.uint8
    if n_atoms <= 32768:
        return torch.int16
    return torch.int32


def _setting(dicts, model, bits, coef, method, uniform, sparsity=None, tokenizer=None):
    """The per-layer plan, key space and RoPE of `compress --bits` / eval (eval.csr.CSR); explicit (s_k, s_v) overrides bits.
    Dictionaries trained with the token predictor get their TokenPredictor (which needs the model's tokenizer) as `.predictor`."""
    from csrtool.eval.csr import CSR
    from csrtool.models import kv_shape, rope_info

    predictor = None
    if dicts.cross_layer:
        raise CsrError("these dictionaries predict each layer from the decoded layer below (train-dict --cross-layer), which a live "
                       "cache holding only codes cannot do yet: use them with compress, decompress and eval; for generate, "
                       "train dictionaries without --cross-layer")
    if dicts.predicted:
        from csrtool.predictor import TokenPredictor

        if tokenizer is None:
            raise CsrError("these dictionaries were trained with the token predictor (train-dict's default): the cache needs the model's tokenizer too "
                           "(CSRCache.from_dicts(..., tokenizer=tokenizer))")
        predictor = TokenPredictor.of_dicts(model, tokenizer, dicts)
    n_layers, heads, head_dim = kv_shape(model.config)
    if sparsity is not None:
        bits = None
    return CSR(dicts, n_layers, heads, head_dim, bits=bits, method=method, coef=coef, rope_info=rope_info(model), uniform=uniform,
               sparsity=sparsity, predictor=predictor)


def packs_indices(n_atoms: int) -> bool:
    """Whether a cache holds indices < n_atoms split-packed (engine.packing.pack_split) rather than in
    index_dtype: when that type would waste more than 25% of its bits on ceil(log2 N)-bit indices and
    the split layout saves some (N = 9..16 bits: 257..2048 atoms; N <= 16). Else the plain integers."""
    bits = packing.index_bits(n_atoms)
    width = torch.iinfo(index_dtype(n_atoms)).bits
    return bits <= 15 and width - bits > width / 4 and packing.split_bits(bits) < width


class _Side:
    """Codes of one side (K or V) of a layer: idx, q [B, H, T, C, S], scale per block (and per token for int8).

    Indices are held in index_dtype, or split-packed (packs_indices: low bytes lo [B, H, T, C·S],
    high fields hi [B, H, T, bytes]) and unpacked to index_dtype when read (`idx`, `codes()`)."""

    def __init__(self, atoms: torch.Tensor, mean: torch.Tensor | None, sparsity: int, coef: str, kind: str):
        self.atoms, self.mean, self.sparsity, self.coef, self.kind = atoms, mean, sparsity, coef, kind
        self.q = self.vscale = None  # vscale [B, H, T]: float16 (int8), float8_e4m3fn (int4, int3; q held as int8)
        self.g = None  # [B, H, blocks] float32
        self.lengths: list[int] = []
        n = atoms.shape[2]
        self.bits, self.packed = packing.index_bits(n), packs_indices(n)
        self._idx = self._lo = self._hi = None  # plain [B, H, T, C, S], or split: lo, hi

    @property
    def fmt(self) -> str:
        """The coefficient format this side's codes are held in (codec.section_format of its sparsity)."""
        return codec.section_format(self.coef, self.kind, self.sparsity, self.atoms.shape[-1])

    @property
    def tokens(self) -> int:
        return 0 if self.q is None else self.q.shape[2]

    @property
    def idx(self) -> torch.Tensor | None:
        """Indices [B, H, T, C, S] in index_dtype (unpacked here when held packed)."""
        if not self.packed or self._hi is None:
            return self._idx
        b, h, t, c, s = self.q.shape
        return packing.unpack_split(self._lo, self._hi, c * s, self.bits, index_dtype(self.atoms.shape[2])).view(b, h, t, c, s)

    def add(self, x: torch.Tensor, method: str, pred=None) -> None:
        """Code x [B, H, n, D] (code space, float32) as one block; pred: the token predictor's part of it (engine Pred), or None."""
        if pred is not None:
            x = x - pred.dense()
        idx, c = codec.encode_codes(codec.shift(x, self.mean, -1.0), self.atoms, self.sparsity, method)
        self._append(idx, c)

    def _append(self, idx: torch.Tensor, c: torch.Tensor) -> None:
        b, h, n = idx.shape[:3]
        q, g, v = codec.quantize_codes(c, self.fmt)
        q = q.reshape(c.shape)
        g = g.reshape(b, h, 1)
        v = None if v is None else v.reshape(b, h, n)
        if self.packed:
            lo, hi = packing.pack_split(idx.reshape(b, h, n, -1), self.bits)
            self._lo, self._hi = _cat(self._lo, lo), _cat(self._hi, hi)
        else:
            self._idx = _cat(self._idx, idx.to(index_dtype(self.atoms.shape[2])))
        self.q, self.g, self.vscale = _cat(self.q, q), _cat(self.g, g), _cat(self.vscale, v)
        self.lengths.append(n)

    def put(self, idx: torch.Tensor, coef: torch.Tensor) -> None:
        """Append one block of codes idx, coef [B, H, n, C, S] (float coefficients), quantised as a file section."""
        self._append(idx, coef)

    def scale(self) -> torch.Tensor:
        """The coefficient scale per token [B, H, T] float32 (int8: times the token's own), or [B, H] for one block of fp8/fp16."""
        if len(self.lengths) == 1:
            scale = self.g[:, :, 0]
        else:
            lengths = torch.tensor(self.lengths, device=self.g.device)
            scale = self.g.repeat_interleave(lengths, dim=2)
        if self.vscale is not None:
            scale = scale[:, :, None] * self.vscale.float() if scale.dim() == 2 else scale * self.vscale.float()
        return scale

    def codes(self, pred=None) -> Codes:
        """The engine's view: scale [B, H] (one block) or [B, H, T]; pred: the predictor's part of the T tokens, or None."""
        return Codes(self.idx, self.q, self.atoms, self.scale(), self.mean, pred)

    def coefficients(self) -> torch.Tensor:
        """The coefficients as numbers, float32 [B, H, T, C, S] (each block's scale applied)."""
        sc = self.scale()
        sc = sc[:, :, None] if sc.dim() == 2 else sc
        return self.q.to(torch.float32) * sc[..., None, None]

    _HELD = ("_idx", "_lo", "_hi", "q", "g", "vscale")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in self._HELD) if t is not None)

    def map_batch(self, fn) -> None:
        for name in self._HELD:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


def _cat(old: torch.Tensor | None, new: torch.Tensor | None) -> torch.Tensor | None:
    """old then new along the tokens (dim 2); either may be None."""
    return new if old is None else old if new is None else torch.cat([old, new], 2)


class CSRLayer(DynamicLayer):
    """One layer: dense sink, coded history, dense tail (window + tokens waiting to be coded)."""

    def __init__(self, cache: "CSRCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        st = cache.setting
        s_k, s_v = st.sparsity(layer_idx)
        dev = cache.device
        mk, mv = st.dicts.mean(layer_idx, "k"), st.dicts.mean(layer_idx, "v")
        self.k = _Side(st.dicts.get(layer_idx, "k").to(dev, torch.float32), None if mk is None else mk.to(dev, torch.float32), s_k, st.coef, "k")
        self.v = _Side(st.dicts.get(layer_idx, "v").to(dev, torch.float32), None if mv is None else mv.to(dev, torch.float32), s_v, st.coef, "v")
        self.rope = cache.layer_rope(layer_idx)  # this layer's rotation (pre-RoPE keys), else None
        self.sink_k = self.sink_v = None  # [B, H, <= sink, D]
        self.tokens = 0  # slots held (sink + coded + tail)
        self.pad: torch.Tensor | None = None  # [B] left padding, learnt from the attention mask (plus offset)
        self.offset = 0  # slot - position of the first slot (a .csr file's -position_offset, see cache_file.load)

    # ------------------------------------------------------------ layout
    @property
    def n_sink(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    @property
    def tail_start(self) -> int:
        return self.n_sink + self.k.tokens

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.keys = self.sink_k = key_states.new_zeros(b, h, 0, d)
        self.values = self.sink_v = value_states.new_zeros(b, h, 0, d)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.tokens += key_states.shape[2]
        k, v = self.keys, self.values
        k._csr_layer = self  # read by cache_attention: the codes and the sink come from the layer
        return k, v

    def age(self, block: int) -> None:
        """Move tail tokens older than the window to the sink (slots < sink) or code them (>= block of them)."""
        upto = self.tokens - self.cache.window
        start = self.tail_start
        if upto <= start:
            return
        if start < self.cache.sink:
            m = min(self.cache.sink, upto) - start
            self.sink_k = torch.cat([self.sink_k, self.keys[:, :, :m]], 2)
            self.sink_v = torch.cat([self.sink_v, self.values[:, :, :m]], 2)
            self.keys, self.values = self.keys[:, :, m:], self.values[:, :, m:]
            start += m
        n = upto - start
        if n < max(1, block):
            return
        xk, xv = self.keys[:, :, :n], self.values[:, :, :n]
        method, pred = self.cache.setting.method, self.cache.pred
        self.k.add(self.to_code_space(xk, start), method, pred(self.layer_idx, "k", start, n))
        self.v.add(xv.to(torch.float32), method, pred(self.layer_idx, "v", start, n))
        self.keys, self.values = self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous()

    def codes(self) -> tuple[Codes, Codes]:
        """The coded tokens' keys and values as the engine reads them (with the token predictor's part, if any)."""
        s, t, pred = self.n_sink, self.k.tokens, self.cache.pred
        return self.k.codes(pred(self.layer_idx, "k", s, t)), self.v.codes(pred(self.layer_idx, "v", s, t))

    def to_code_space(self, k: torch.Tensor, slot0: int) -> torch.Tensor:
        """Keys [B, H, n, D] at slots slot0.. -> the dictionary's key space (float32), each sequence at its real positions
        (slot - pad; padding tokens get negative positions, harmless as they are never attended)."""
        st = self.cache.setting
        kf = k.to(torch.float32)
        if st.key_space == "post-rope":
            return kf
        rp = self.rope  # the rotation codec.to_code_space applies (engine.rope.unrotate), per sequence
        pads = [int(p) for p in self.pads()]
        pos = torch.arange(slot0, slot0 + k.shape[2], device=k.device, dtype=torch.float32)
        return torch.cat([_rope.unrotate(kf[b : b + 1], pos - pad, rp.inv_freq.to(k.device), rp.scaling) for b, pad in enumerate(pads)])

    def key_pos0(self) -> torch.Tensor | None:
        """[B] position of the first coded token of each sequence (pre-RoPE keys), else None."""
        if self.cache.setting.key_space == "post-rope":
            return None
        return self.n_sink - self.pads()

    def pads(self) -> torch.Tensor:
        """[B] slot - position of each sequence's tokens: the learnt left padding, or the offset alone before any mask."""
        if self.pad is not None:
            return self.pad
        return torch.full((self.keys.shape[0],), self.offset, dtype=torch.int64, device=self.keys.device)

    def note_valid(self, valid: torch.Tensor | None) -> None:
        """Learn the left padding from the 2-D mask valid [B, slots] (None: no padding)."""
        if valid is None:
            return
        first = valid.to(torch.int8).argmax(dim=1)  # first real token; an all-padding row gives 0
        self.pad = first.to(torch.int64) + self.offset

    # ------------------------------------------------------------ transformers' Cache API
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.cache, self.layer_idx)

    def reorder_cache(self, beam_idx) -> None:
        raise CsrError("CSRCache does not support beam search (its codes cannot be reordered between beams yet): use greedy or sampling (num_beams=1)")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise CsrError("CSRCache cannot drop tokens (assisted decoding / prompt lookup crop the cache): generate without an assistant")

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values, self.sink_k, self.sink_v = (fn(t) for t in (self.keys, self.values, self.sink_k, self.sink_v))
        self.k.map_batch(fn)
        self.v.map_batch(fn)
        if self.pad is not None:
            self.pad = fn(self.pad)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        self._map_batch(lambda t: t[indices])

    def nbytes(self) -> dict:
        dense = sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.sink_k, self.sink_v) if t is not None)
        return {"codes": self.k.nbytes() + self.v.nbytes(), "dense": dense}


class CSRCache(Cache):
    """A transformers Cache whose layers hold old tokens as sparse codes (see the module doc)."""

    def __init__(self, setting, model, window: int, sink: int, block: int, reference: bool = False):
        for name, val, lo in (("window", window, 0), ("sink", sink, 0), ("block", block, 1)):
            if not isinstance(val, int) or isinstance(val, bool) or val < lo:
                raise CsrError(f"{name} must be an integer >= {lo}, got {val!r}")
        self.setting = setting
        self.window, self.sink, self.block = window, sink, block
        self.reference = reference  # attend by reconstruction (engine.history.attend_reference)
        self.device = model.device
        self.model = model
        self.rope_params = setting.rope  # pre-RoPE keys: the rotations, per layer (keyspace.RopeParams), else None
        self._ropes: dict[tuple, Rope] = {}  # one engine Rope per distinct rotation, shared by its layers (cos/sin tables too)
        n_layers = len(setting.layer_sparsity or ()) or _n_layers(model)
        if self.rope_params is not None:
            self.rope_params.check_layers(n_layers)
        sliding = _sliding_layers(model)
        super().__init__(layers=[
            DynamicSlidingWindowLayer(sliding_window=sliding[i]) if i in sliding else CSRLayer(self, i) for i in range(n_layers)
        ])
        self.predictions = None  # dictionaries trained with the token predictor: the token ids and predictions (cache_predictor)
        self._unhook = None
        if setting.dicts.predicted:
            from csrtool.cache_predictor import LivePredictions

            coded = {i for i in range(n_layers) if i not in sliding}
            self.predictions = LivePredictions(setting.dicts, setting.predictor, coded)
            self._unhook = self.predictions.hook(model)
        from csrtool import cache_attention

        self._restore = cache_attention.install(model)

    def pred(self, layer: int, kind: str, slot0: int, t: int):
        """The token predictor's part of slots slot0..slot0+t-1 of a layer (engine Pred), or None (plain dictionaries, t = 0)."""
        if self.predictions is None or t == 0:
            return None
        return self.predictions.pred(layer, kind, slot0, t)

    def layer_rope(self, layer: int) -> Rope | None:
        """The engine's rotation for layer `layer`'s pre-RoPE keys (shared by the layers that rotate alike), or None."""
        if self.rope_params is None:
            return None
        rp = self.rope_params.for_layer(layer)
        key = (rp.inv_freq, rp.scaling)
        if key not in self._ropes:
            self._ropes[key] = Rope(torch.tensor(rp.inv_freq, dtype=torch.float32, device=self.device), rp.scaling)
        return self._ropes[key]

    @classmethod
    def from_dicts(
        cls, dicts, model, bits: float = 1.0, window: int = codec.DEFAULT_WINDOW, sink: int = codec.DEFAULT_SINK,
        block: int = DEFAULT_BLOCK, coef: str = "fp8", method: str = "omp", uniform: bool = False, reference: bool = False,
        sparsity: tuple[int, int] | None = None, tokenizer=None,
    ) -> "CSRCache":
        """A cache for `model` coding with `dicts` (a DictSet or a path) at `bits` per channel, as compress --bits does
        (`sparsity` = (s_k, s_v) for every layer instead of a bit budget). Dictionaries trained with the token predictor
        need the model's `tokenizer` (the predictor reads a newline before each token)."""
        if not hasattr(dicts, "atoms"):
            from pathlib import Path

            from csrtool.formats.dicts import load_dicts

            dicts = load_dicts(Path(dicts))
        return cls(_setting(dicts, model, bits, coef, method, uniform, sparsity, tokenizer), model, window, sink, block, reference)

    @classmethod
    def from_csr(cls, path, dicts, model, block: int = DEFAULT_BLOCK, reference: bool = False, tokenizer=None) -> "CSRCache":
        """A cache holding a .csr file's tokens as codes (no dense decompress); generation continues after them
        (`tokenizer`: as for from_dicts)."""
        from csrtool import cache_file

        if not hasattr(dicts, "atoms"):
            from pathlib import Path

            from csrtool.formats.dicts import load_dicts

            dicts = load_dicts(Path(dicts))
        return cache_file.load(path, dicts, model, block, reference, tokenizer)

    def save(self, path, model_name: str | None = None) -> int:
        """Write the cache's tokens to a .csr file (cache_file.save: the waiting tail tokens are coded first,
        the coefficients quantised once more with one scale per (batch, head)); returns the file's size."""
        from csrtool import cache_file

        return cache_file.save(self, path, model_name)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        from csrtool import cache_attention

        if self._restore is None or not cache_attention.installed(self.model):
            raise CsrError("the model no longer attends through CSRCache (the cache was closed, or the attention implementation was changed): make a new CSRCache")
        if layer_idx == 0 and self.predictions is not None:  # a new forward: its token ids join the cache's
            self.predictions.take(key_states.shape[0], key_states.shape[2])
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.predictions is not None:
            self.predictions.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices) -> None:
        super().batch_select_indices(indices)
        if self.predictions is not None:
            self.predictions.map_batch(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    def nbytes(self) -> dict:
        """Bytes held: codes (indices, coefficients, scales), dense (sink + tail), predictor (the token predictor's tables,
        ids and rows: dictionaries trained with the token predictor), their total; dicts (the layers' dictionaries, separately)."""
        codes = dense = dicts = 0
        for layer in self.layers:
            if not isinstance(layer, CSRLayer):  # a sliding-window layer: at most its window, dense
                dense += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
                continue
            n = layer.nbytes()
            codes += n["codes"]
            dense += n["dense"]
            for side in (layer.k, layer.v):
                dicts += side.atoms.numel() * side.atoms.element_size()
                dicts += 0 if side.mean is None else side.mean.numel() * side.mean.element_size()
        pred = 0 if self.predictions is None else self.predictions.nbytes()
        return {"codes": codes, "dense": dense, "predictor": pred, "total": codes + dense + pred, "dicts": dicts}

    def close(self) -> None:
        """Give the model its own attention implementation back."""
        if self._restore is not None:
            self._restore()
            self._restore = None
        if self._unhook is not None:
            self._unhook()
            self._unhook = None

    def __enter__(self) -> "CSRCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _n_layers(model) -> int:
    from csrtool.models import kv_shape

    return kv_shape(model.config)[0]


def _sliding_layers(model) -> dict[int, int]:
    """{layer: window} of the model's sliding-window layers (kept dense, as a DynamicCache keeps them: at most the window)."""
    from csrtool.models import text_config

    cfg = text_config(model.config)
    types = getattr(cfg, "layer_types", None) or []
    bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
    if bad:
        raise CsrError(f"{type(model).__name__} has {', '.join(bad)} layers: CSRCache supports full and sliding-window attention layers")
    return {i: cfg.sliding_window for i, t in enumerate(types) if t == "sliding_attention"}
