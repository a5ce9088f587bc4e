"""The token predictor's part of a live cache (CSRCache with dictionaries trained with the token predictor).

Those dictionaries code what the predictor leaves (csrtool.predictor): coding subtracts each token's
prediction, attention adds it back. The cache therefore keeps:
- the token ids it was fed: an input-embedding hook records each forward's ids, and the
  cache takes them when layer 0 is updated (a forward fed `inputs_embeds` has none: CsrError);
- each slot's row in a table of the distinct prediction keys (a token and the context - 1
  tokens before it), computed when the slot is first coded or read;
- per served layer and kind (a layer with a map, coded by the cache), the mapped predictions
  as int8 [H, rows, D] with a float16 scale per row [H, rows] on the cache's device, and the
  map's channel scales [H, D] (every decoder rounds them so: predictor.apply_map / raw_map), grown by a quarter when full. Keys not seen before cost one
  model pass over them (TokenPredictor.compute, at most BATCH per pass, outside the cache:
  the pass uses its own DynamicCache and plain attention).

Attention reads them as engine Pred(table, rows) (engine/history.py): O(T) per step, not
O(T·D). Their bytes count in the cache's nbytes ("predictor"): per distinct key and served
layer 2·H·(D + 2) bytes, about half what a dense float16 token holds (train-dict
--predictor-depth limits the layers; --no-predictor leaves them out).

    LivePredictions(dicts, predictor, layers)    predictor: the model's TokenPredictor; layers: the cache's coded ones
    .hook(model) -> remove()     record each forward's input ids
    .take(batch, n)              the current forward's ids join the cache's (layer 0's update)
    .set_ids(ids [B, T])         a .csr file's ids (CSRCache.from_csr)
    .pred(layer, kind, slot0, t) -> engine Pred | None      for the slots slot0..slot0+t-1
    .ids_list() -> B lists of ints; .map_batch(fn); .nbytes()
"""

from __future__ import annotations

import torch

from csrtool.engine.history import Pred
from csrtool.errors import CsrError
from csrtool.formats.dicts import parse_dict_name
from csrtool.predictor import map_channels, raw_map, store_rows


class LivePredictions:
    """The predictions a CSRCache adds to its coded tokens (see the module doc)."""

    def __init__(self, dicts, predictor, layers: set[int]):
        self.predictor = predictor  # csrtool.predictor.TokenPredictor of the cache's model (its compute() only)
        model = predictor.model
        self.device = model.device
        self.maps = {}  # (layer, kind) -> A [H, D + 2, D] on the device (predictor.fit_prediction)
        for name, a in dicts.maps.items():
            layer, kind = parse_dict_name(name)
            if layer in layers:
                self.maps[(layer, kind)] = a.to(self.device, torch.float32)
        self.channels = {key: map_channels(a) for key, a in self.maps.items()}  # [H, D] or None (a map without them)
        self.tables: dict[tuple[int, str], torch.Tensor] = {}  # (layer, kind) -> int8 [H, capacity, D]; rows < len(index) used
        self.scales: dict[tuple[int, str], torch.Tensor] = {}  # (layer, kind) -> float16 [H, capacity]
        self.index: dict[tuple[int, ...], int] = {}
        self.ids: torch.Tensor | None = None  # [B, slots] int32 (CPU): every token fed
        self.rows: torch.Tensor | None = None  # [B, n] int32 (device): the rows of slots 0..n-1
        self._pending: torch.Tensor | None = None
        self._busy = False

    # ------------------------------------------------------------ token ids
    def hook(self, model):
        """Record the input ids of each forward of `model` (except the predictor's own passes); returns the remover."""

        def on_embed(module, args, kwargs, output):
            ids = args[0] if args else kwargs.get("input")
            if not self._busy and torch.is_tensor(ids) and not ids.is_floating_point():
                self._pending = ids.detach()

        return model.get_input_embeddings().register_forward_hook(on_embed, with_kwargs=True).remove

    def take(self, batch: int, n: int) -> None:
        """The current forward's ids [batch, n] join the cache's."""
        ids, self._pending = self._pending, None
        if ids is None or tuple(ids.shape) != (batch, n):
            raise CsrError("a cache with token-predictor dictionaries needs each step's token ids: run the model with "
                           "input_ids (not inputs_embeds)")
        ids = ids.to("cpu", torch.int32)
        self.ids = ids if self.ids is None else torch.cat([self.ids, ids], 1)

    def set_ids(self, ids: torch.Tensor) -> None:
        self.ids, self.rows = ids.to("cpu", torch.int32), None

    def ids_list(self) -> list[list[int]]:
        return [] if self.ids is None else self.ids.tolist()

    # ------------------------------------------------------------ predictions
    def _store(self, key: tuple[int, str], q: torch.Tensor, scale: torch.Tensor, at: int) -> None:
        """Write rows q [H, n, D] (int8) and their scales [H, n] at row `at` of a table (predictor.store_rows)."""
        self.tables[key] = store_rows(self.tables.get(key), q, at, 1)
        self.scales[key] = store_rows(self.scales.get(key), scale, at, 1)

    def _rows_upto(self, n: int) -> None:
        """Rows for slots < n (new keys' predictions computed and mapped)."""
        have = 0 if self.rows is None else self.rows.shape[1]
        if n <= have:
            return
        if self.ids is None or self.ids.shape[1] < n:
            raise CsrError(f"the cache knows the token ids of {0 if self.ids is None else self.ids.shape[1]} slots but codes slot {n - 1}")
        keys = [self.predictor.keys(row[:n], last=n - have) for row in self.ids]
        new = [k for k in dict.fromkeys(k for ks in keys for k in ks) if k not in self.index]
        self._busy = True
        try:
            for part, kv in self.predictor.compute(new):
                at = len(self.index)
                for (layer, kind), a in self.maps.items():
                    self._store((layer, kind), *raw_map(kv[kind][layer].to(self.device), a), at)
                for k in part:
                    self.index[k] = len(self.index)
        finally:
            self._busy = False
        rows = torch.tensor([[self.index[k] for k in ks] for ks in keys], dtype=torch.int32, device=self.device)
        self.rows = rows if self.rows is None else torch.cat([self.rows, rows], 1)

    def pred(self, layer: int, kind: str, slot0: int, t: int) -> Pred | None:
        """The prediction of slots slot0..slot0+t-1 as an engine Pred, or None where the layer has no map."""
        if (layer, kind) not in self.maps:
            return None
        assert t > 0, t
        self._rows_upto(slot0 + t)
        n = len(self.index)
        return Pred(self.tables[(layer, kind)][:, :n], self.rows[:, slot0 : slot0 + t], self.scales[(layer, kind)][:, :n],
                    self.channels[(layer, kind)])

    # ------------------------------------------------------------ batch and bytes
    def map_batch(self, fn) -> None:
        """Apply a batch reordering (repeat, select) to the ids and rows."""
        self.ids = None if self.ids is None else fn(self.ids)
        self.rows = None if self.rows is None else fn(self.rows)

    def nbytes(self) -> int:
        held = [*self.tables.values(), *self.scales.values(), *(t for t in (self.ids, self.rows) if t is not None)]
        return sum(t.numel() * t.element_size() for t in held)
