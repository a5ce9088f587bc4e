"""Pipeline step: a layer's keys or values as a compressed cache gives them back, without a file.

Evaluation (csrtool.eval) and calibration (csrtool.calibration) both simulate a
cache whose old tokens are CSR-coded; this module is what they share, below both:

    Reconstructor(dicts, config: codec.CodecConfig, rope_info=None, predictor=None)   rope_info: models.rope_info(model)
    Reconstructor.rope -> codec.RopeParams | None   (pre-RoPE dictionaries: the rotations, per layer)
    Reconstructor.sparsity(layer) -> (s_k, s_v)
    Reconstructor.reconstruct(layer, kind, x [B, H, T, D], positions [T], ids [B, T' >= T]) -> x_hat [B, H, T, D]
    Reconstructor.prime(keys, values, ids)   cross-layer dictionaries: code every layer of a window once, in order
    Reconstructor.reset()                    forget the decoded layers (a new sequence)

Dictionaries trained with the token predictor (dicts.predicted) code what it leaves:
`predictor` (csrtool.predictor.TokenPredictor of the model) and the `ids` of the sequence from its
start up to the coded tokens (they are its last T) are then needed, and the predicted part joins the
dictionary's mean as a per-token offset.

Dictionaries with cross-layer maps (dicts.cross_layer, csrtool.crosslayer) predict each layer
from the decoded layer below: the Reconstructor keeps what it decoded last per layer and kind
(code space), so the layers of the same tokens must be reconstructed in order, keys before values,
as a cache ages its tokens (csrtool.eval.runner) and `prime` does. Inputs not decoded count as
zeros: tokens a sliding-window layer below dropped before they were coded (a window shorter than
eval's chunk), or a layer reconstructed out of order.

    CHUNK, WINDOW, SINK   how eval feeds tokens: chunk size, full-precision window, sink tokens

Reconstruction goes through `codec.roundtrip` / `roundtrip_keys`, so the coefficient
quantisation and the key space (pre- or post-RoPE, from the dictionary file's
source) are exactly those of compress -> decompress. The plan (sparsities per
layer) comes from csrtool.calibration.allocate.codec_plan.
"""

from __future__ import annotations

import torch

from csrtool import codec
from csrtool.errors import CsrError
from csrtool.formats.dicts import DictSet

CHUNK = 64  # tokens fed per forward pass in eval
WINDOW = 32  # most recent tokens eval keeps in full precision
SINK = codec.DEFAULT_SINK  # first tokens kept in full precision by every method (attention sinks)


class Reconstructor:
    """Keys/values of any layer coded with `dicts` at `config` and decoded again."""

    def __init__(self, dicts: DictSet, config: codec.CodecConfig, rope_info: dict | None = None, predictor=None):
        self.dicts = dicts
        if dicts.predicted:
            from csrtool.predictor import PREFIX_TEXT

            if predictor is None:
                raise CsrError("these dictionaries code what the token predictor leaves (train-dict's default): the model is needed to decode them")
            if dicts.source.get("predictor_prefix") != PREFIX_TEXT:
                raise CsrError("the dictionary file's token predictor is not this csrtool's: re-run csrtool train-dict")
        self.predictor = predictor if dicts.predicted else None
        self.config = config
        self.key_space = dicts.source.get("key_space", "post-rope")
        if self.key_space not in codec.KEY_SPACES:
            raise CsrError(f"the dictionary file has unknown key_space {self.key_space!r}: re-run csrtool train-dict")
        if self.key_space == "pre-rope" and rope_info is None:
            raise CsrError("the dictionaries code keys before RoPE but this model has no fixed RoPE to undo: use post-RoPE dictionaries")
        self.rope_info = rope_info  # models.rope_info's dict (per-layer rotations in 'layers')
        self.decoded = None
        if dicts.cross_layer:
            from csrtool.crosslayer import Decoded

            self.decoded = Decoded()

    def reset(self) -> None:
        """Forget the decoded layers of earlier tokens (each sequence's coding starts again at layer 0)."""
        if self.decoded is not None:
            self.decoded.clear()

    def prime(self, keys: list[torch.Tensor], values: list[torch.Tensor], ids: torch.Tensor | None) -> None:
        """Reconstruct every layer's keys and values [B, H, T, D] (keys as cached, post-RoPE, at positions 0..T-1)
        in order, so that any one layer can then be reconstructed alone (sensitivity calibration)."""
        pos = torch.arange(keys[0].shape[2], device=keys[0].device)
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.reconstruct(layer, "k", k, pos, ids)
            self.reconstruct(layer, "v", v, pos, ids)

    @property
    def rope(self) -> codec.RopeParams | None:
        """rope_info validated (position 0) when keys are coded before RoPE, else None; .for_layer(i) is layer i's."""
        if self.key_space != "pre-rope":
            return None
        return codec.RopeParams.from_meta({"rope": self.rope_info})

    def sparsity(self, layer: int) -> tuple[int, int]:
        cfg = self.config.for_layer(layer)
        return cfg.sparsity_k, cfg.sparsity_v

    def offset(self, layer: int, kind: str, ids: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """What is subtracted before coding x [B, H, T, D] (code space): the mean [G, D], plus the prediction [B, H, T, D]."""
        mean = self.dicts.mean(layer, kind)
        if self.predictor is not None:
            from csrtool.predictor import offset

            if ids is None or ids.shape[0] != x.shape[0] or ids.shape[1] < x.shape[2]:
                raise CsrError(f"the token predictor needs the ids [B, >= T] of the sequence up to the coded tokens, got {None if ids is None else list(ids.shape)}")
            mean = offset(self.dicts, self.predictor, layer, kind, ids, x.shape[2]).to(x.device)
        w = self.dicts.xmap(layer, kind)
        if w is None:
            return mean
        from csrtool import crosslayer

        t = x.shape[2]
        first = (ids.shape[1] if ids is not None else t) - t  # the coded tokens are the last t of the sequence
        return codec.shift(crosslayer.offset(w, self.decoded, layer, kind, first, t, like=x, depth=self.dicts.cross_depth).to(x.device), mean, 1.0)

    def reconstruct(self, layer: int, kind: str, x: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, H, T, D] as the cache stores it (keys post-RoPE) at consecutive positions [T] -> x_hat; ids [B, T'] the
        sequence's tokens up to and including these (needed by token-predictor dictionaries)."""
        atoms = self.dicts.get(layer, kind).to(x.device)
        mean = self.offset(layer, kind, ids, x)
        s_k, s_v = self.sparsity(layer)
        coef, method = self.config.coef, self.config.method
        if kind == "v" or self.key_space == "post-rope":
            x_hat = code = codec.roundtrip(x.to(torch.float32), atoms, s_v if kind == "v" else s_k, coef, method, mean, self.config.adaptive, kind)
            x_hat = codec.to_dtype(x_hat, x.dtype)
        else:
            first = int(positions[0])
            assert bool((positions == torch.arange(first, first + x.shape[2], device=positions.device)).all())
            x_hat, code = codec.roundtrip_keys_code(
                x, atoms, s_k, coef, method,
                positions_offset=first, rope_info=self.rope_info,
                key_space=self.key_space, cache_key_space="post-rope", mean=mean, layer=layer, adaptive=self.config.adaptive,
            )
        if self.decoded is not None:
            t = x.shape[2]
            self.decoded.put(layer, kind, (ids.shape[1] if ids is not None else t) - t, code)
        return x_hat
