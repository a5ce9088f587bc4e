"""Pipeline step: measure where a dictionary set's errors hurt the model, for bit allocation.

    calibrate(loaded, atoms, source, probe_ids, progress) -> sensitivity (JSON-able dict)

On the probe window `csrtool collect` keeps after its activations (held-out
calibration tokens), with the dictionaries at the uniform 1-bit sparsity:
- the KL each single layer's coded keys or values cause (csrtool.calibration.sensitivity);
- each layer's relative error curve for 1..S_max atoms (csrtool.calibration.allocate.error_curve);
their product is the loss curve D(S) that `allocate` minimises under a bit budget.
The result is stored in the dictionary file (metadata `sensitivity`).
"""

from __future__ import annotations

from typing import Callable

import torch

from csrtool.calibration.allocate import check_dicts, codec_plan, error_curve, loss_curve
from csrtool.collect import capture_kv, key_rope
from csrtool.formats.dicts import DictSet, dict_name
from csrtool.errors import CsrError
from csrtool.models import Loaded, kv_shape, rope_info
from csrtool.calibration.sensitivity import layer_sensitivity
from csrtool.reconstruct import CHUNK, SINK, WINDOW, Reconstructor

RECENT = WINDOW + CHUNK // 2  # tokens a query sees exactly in eval: the window plus half a chunk (64)
REF_BITS = 1.0  # sensitivities are measured at the uniform sparsity of this budget


def calibrate(
    loaded: Loaded, atoms: dict[str, torch.Tensor], source: dict, probe_ids: list[int],
    progress: Callable[[int, int], None] | None = None, means: dict[str, torch.Tensor] | None = None,
    layers: list[int] | None = None, maps: dict[str, torch.Tensor] | None = None, predictor=None,
    xmaps: dict[str, torch.Tensor] | None = None, config: dict | None = None,
) -> dict:
    """Sensitivities of `layers` (default all; a torchrun rank passes its share, `merge` joins the parts).

    `maps`: the token predictor's (train-dict --predictor), with `predictor` its TokenPredictor (made here if None).
    `config`: the training config, as the dictionary file will record it (the cross-layer maps' depth is read there)."""
    n_layers, heads, head_dim = kv_shape(loaded.config)
    ds = DictSet(atoms=atoms, config=config or {}, source=source, means=means or {}, maps=maps or {}, xmaps=xmaps or {})
    if len(ds.layers) != n_layers:
        raise CsrError(f"sensitivity calibration needs dictionaries for all {n_layers} layers (have {len(ds.layers)}): train without --layers or pass --no-calibrate")
    key_space = source.get("key_space", "post-rope")
    n_atoms, value_split = check_dicts(ds, n_layers, heads, head_dim)
    try:
        ref = codec_plan(ds, n_layers, heads, head_dim, bits=REF_BITS, method="omp", uniform=True)
    except CsrError:  # small head_dim: one atom each already costs more than REF_BITS
        ref = codec_plan(ds, n_layers, heads, head_dim, sparsity=(1, 1), method="omp")
    s_ref = (ref.sparsity_k, ref.sparsity_v)
    if ds.predicted and predictor is None:
        from csrtool.predictor import TokenPredictor

        predictor = TokenPredictor.for_dicts(loaded, ds)
    method = Reconstructor(ds, ref, rope_info(loaded.model), predictor)
    ids = torch.tensor([probe_ids], dtype=torch.long, device=loaded.device)
    if ds.cross_layer:  # each layer's coding reads the layers below decoded: code every layer of the window once, in order
        ks, vs = capture_kv(loaded.model, ids, "post-rope", None)
        method.prime(ks, vs, ids)
    layers = list(range(n_layers)) if layers is None else list(layers)
    total = 2 * len(layers)
    done = [0]

    def tick(layer: int, kind: str) -> None:
        done[0] += 1
        if progress:
            progress(done[0], total)

    kl = layer_sensitivity(loaded.model, ids, method, recent=RECENT, sink=SINK, progress=tick, layers=layers)
    keys, values = capture_kv(loaded.model, ids, key_space, key_rope(loaded.model, key_space))
    s_max = {"k": min(n_atoms, head_dim // 2), "v": min(n_atoms, head_dim // value_split // 2)}
    s_at = {"k": s_ref[0], "v": s_ref[1]}
    curves, kls = {}, {}
    for layer in layers:
        for kind, x in (("k", keys[layer]), ("v", values[layer])):
            xs = x[:, :, SINK:].float()
            errs = error_curve(xs.cpu(), atoms[dict_name(layer, kind)], max(s_max[kind], s_at[kind]), method.offset(layer, kind, ids, xs))
            curves[dict_name(layer, kind)] = loss_curve(kl[(layer, kind)], errs, s_at[kind])
            kls[dict_name(layer, kind)] = kl[(layer, kind)]
    return {"s_ref": list(s_ref), "recent": RECENT, "sink": SINK, "tokens": len(probe_ids), "kl": kls, "curves": curves}


def merge(parts: list[dict]) -> dict:
    """One sensitivity dict from the per-rank results of `calibrate` over disjoint layer lists."""
    merged = {**parts[0], "kl": {}, "curves": {}}
    for part in parts:
        merged["kl"].update(part["kl"])
        merged["curves"].update(part["curves"])
    return merged
